//! Batches from a split's shards, world-size invariant (METHODS.md §15): the global batch of
//! a step is, for every shard in order, that shard's next `per_shard` rows of its own seeded
//! per-epoch shuffle. A rank that owns a subset of the shards takes exactly those shards'
//! parts, so the union over ranks is the same global batch for any world size.

use serde::{Deserialize, Serialize};

use crate::backend::HostBatch;
use crate::data::dataset::Dataset;
use crate::data::shard::SplitKind;
use crate::error::{Error, Result};
use crate::rng::{Purpose, Stream};

/// Where one shard's reading stands; part of the checkpointed state.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, bincode::Encode, bincode::Decode,
)]
pub struct Cursor {
    /// The shard's epoch (how many times it has been read through).
    pub epoch: u64,
    /// Rows of this epoch's order already taken.
    pub pos: u64,
}

/// A sample's place: its split, shard and row in the shard (what the Temporal Ensembling
/// bank is indexed by).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RowId {
    pub split: SplitKind,
    pub shard: u32,
    pub row: u32,
}

/// A reader of one split, over the shards a rank owns.
pub struct Loader {
    split: SplitKind,
    seed: u64,
    per_shard: usize,
    /// Indices of the owned shards, ascending.
    owned: Vec<usize>,
    /// One cursor per shard of the split (all P, so checkpoints are rank-independent).
    cursors: Vec<Cursor>,
    /// The current epoch's order of each owned shard.
    orders: Vec<Vec<u32>>,
    buckets: u32,
    /// The samples of the last batch, in order, and the epoch of their shard when drawn.
    last: Vec<RowId>,
    last_epochs: Vec<u64>,
    /// The hidden labels of the last batch's unlabeled samples (-1 where unknown), for
    /// diagnostics only (pseudo-label accuracy); nothing that trains may read them.
    last_hidden: Vec<i32>,
}

/// Shard `shard`'s row order in `epoch`.
fn order(seed: u64, split: SplitKind, shard: usize, epoch: u64, len: usize) -> Vec<u32> {
    let mut v: Vec<u32> = (0..len as u32).collect();
    let index = ((split as u64) << 56) ^ ((shard as u64) << 32) ^ epoch;
    Stream::new(seed, Purpose::Shuffle, index).shuffle(&mut v);
    v
}

impl Loader {
    /// A loader of `split` over the shards `owned` (all shards for a single process),
    /// taking `per_shard` rows of each shard per batch.
    pub fn new(
        ds: &Dataset,
        split: SplitKind,
        seed: u64,
        per_shard: usize,
        owned: Vec<usize>,
    ) -> Result<Loader> {
        let shards = ds.shards(split);
        if let Some(empty) = owned.iter().find(|&&s| shards[s].is_empty()) {
            return Err(Error::Data(format!(
                "shard {empty} of split `{}` is empty: with {} documents in {} shards, some shards have none; \
                 prepare the data with fewer shards (--shards)",
                split.name(),
                shards.iter().map(|s| s.len()).sum::<usize>(),
                shards.len()
            )));
        }
        let cursors = vec![Cursor::default(); shards.len()];
        let orders = owned.iter().map(|&s| order(seed, split, s, 0, shards[s].len())).collect();
        Ok(Loader {
            split,
            seed,
            per_shard,
            owned,
            cursors,
            orders,
            buckets: ds.manifest().tokenizer.buckets,
            last: Vec::new(),
            last_epochs: Vec::new(),
            last_hidden: Vec::new(),
        })
    }

    /// The cursors of all shards (for checkpoints).
    pub fn cursors(&self) -> &[Cursor] {
        &self.cursors
    }

    /// Restores cursors saved by [`Loader::cursors`].
    pub fn restore(&mut self, ds: &Dataset, cursors: &[Cursor]) -> Result<()> {
        if cursors.len() != self.cursors.len() {
            return Err(Error::Data(format!(
                "the checkpoint has cursors for {} shards, the data set has {}",
                cursors.len(),
                self.cursors.len()
            )));
        }
        let shards = ds.shards(self.split);
        for (s, (c, shard)) in cursors.iter().zip(shards).enumerate() {
            if c.pos as usize > shard.len() {
                return Err(Error::Data(format!(
                    "the checkpoint's cursor of shard {s} is at row {}, but the shard has {} documents: \
                     the data set changed",
                    c.pos,
                    shard.len()
                )));
            }
        }
        self.cursors = cursors.to_vec();
        for (k, &s) in self.owned.iter().enumerate() {
            self.orders[k] = order(self.seed, self.split, s, self.cursors[s].epoch, shards[s].len());
        }
        Ok(())
    }

    /// The next batch: `per_shard` rows from each owned shard, in shard order. Every id is
    /// checked against the bucket count.
    pub fn next_batch(&mut self, ds: &Dataset) -> Result<HostBatch> {
        let shards = ds.shards(self.split);
        let mut batch = HostBatch::default();
        self.last.clear();
        self.last_epochs.clear();
        self.last_hidden.clear();
        for (k, &s) in self.owned.iter().enumerate() {
            let shard = &shards[s];
            for _ in 0..self.per_shard {
                let c = &mut self.cursors[s];
                if c.pos as usize == shard.len() {
                    c.epoch += 1;
                    c.pos = 0;
                    self.orders[k] = order(self.seed, self.split, s, c.epoch, shard.len());
                }
                let row = self.orders[k][c.pos as usize] as usize;
                c.pos += 1;
                let doc = shard.doc(row);
                if let Some(&bad) = doc.ids.iter().find(|&&id| id >= self.buckets) {
                    return Err(Error::bad_file(
                        shard.path(),
                        format!(
                            "corrupted: document {row} has id {bad}, not below the bucket count {}",
                            self.buckets
                        ),
                    ));
                }
                batch.push(doc.ids, doc.label.map_or(-1, |l| l as i32));
                self.last.push(RowId { split: self.split, shard: s as u32, row: row as u32 });
                self.last_epochs.push(self.cursors[s].epoch);
                if self.split == SplitKind::Unlabeled {
                    self.last_hidden.push(shard.hidden_label(row).map_or(-1, |l| l as i32));
                }
            }
        }
        Ok(batch)
    }

    /// The samples of the last batch, in its order.
    pub fn last_rows(&self) -> &[RowId] {
        &self.last
    }

    /// The epoch of each sample's shard when the last batch drew it (augmentation keys).
    pub fn last_epochs(&self) -> &[u64] {
        &self.last_epochs
    }

    /// Diagnostics only: the hidden labels of the last batch's unlabeled samples (-1 where
    /// unknown; empty for a labeled split). They feed the pseudo-label accuracy in
    /// `metrics.jsonl` and nothing else.
    pub fn last_hidden_labels(&self) -> &[i32] {
        &self.last_hidden
    }
}

/// Every document of a split's owned shards, in shard order, in batches of at most `size`
/// (for evaluation; no shuffling).
pub fn sequential(ds: &Dataset, split: SplitKind, size: usize) -> Result<Vec<HostBatch>> {
    let buckets = ds.manifest().tokenizer.buckets;
    let mut out = Vec::new();
    let mut batch = HostBatch::default();
    for shard in ds.shards(split) {
        for i in 0..shard.len() {
            let doc = shard.doc(i);
            if let Some(&bad) = doc.ids.iter().find(|&&id| id >= buckets) {
                return Err(Error::bad_file(
                    shard.path(),
                    format!("corrupted: document {i} has id {bad}, not below the bucket count {buckets}"),
                ));
            }
            batch.push(doc.ids, doc.label.map_or(-1, |l| l as i32));
            if batch.len() == size {
                out.push(std::mem::take(&mut batch));
            }
        }
    }
    if !batch.is_empty() {
        out.push(batch);
    }
    Ok(out)
}
