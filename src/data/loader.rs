//! Batches from a split's shards, world-size invariant (METHODS.md §15): the global batch of
//! a step is, for every shard in order, that shard's next `per_shard` rows of its own seeded
//! per-epoch shuffle. A rank that owns a subset of the shards takes exactly those shards'
//! parts, so the union over ranks is the same global batch for any world size.

use serde::{Deserialize, Serialize};

use crate::backend::HostBatch;
use crate::data::dataset::Dataset;
use crate::data::shard::{DocLimits, Shard, SplitKind};
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
    group: Grouping,
    /// Indices of the owned shards, ascending.
    owned: Vec<usize>,
    /// One cursor per shard of the split (all P, so checkpoints are rank-independent).
    cursors: Vec<Cursor>,
    /// The current epoch's order of each owned shard.
    orders: Vec<Vec<u32>>,
    limits: DocLimits,
    /// The samples of the last batch, in order, and the epoch of their shard when drawn.
    last: Vec<RowId>,
    last_epochs: Vec<u64>,
    /// The hidden labels of the last batch's unlabeled samples (-1 where unknown), for
    /// diagnostics only (pseudo-label accuracy); nothing that trains may read them.
    last_hidden: Vec<i32>,
}

/// Shard `shard`'s row order in `epoch`: a seeded shuffle, then, when `group` is set,
/// [`group_by_length`] over windows of `group` batches of `per_shard` rows.
fn order(seed: u64, split: SplitKind, shard: &Shard, index: usize, epoch: u64, group: Grouping) -> Vec<u32> {
    let mut v: Vec<u32> = (0..shard.len() as u32).collect();
    let key = ((split as u64) << 56) ^ ((index as u64) << 32) ^ epoch;
    Stream::new(seed, Purpose::Shuffle, key).shuffle(&mut v);
    if group.window > 0 {
        let base = ((split as u64) << 56) ^ (epoch << 24);
        group_by_length(&mut v, |r| shard.doc(r as usize).ids.len(), group, seed, base);
    }
    v
}

/// Length grouping of a shuffled order: `window` batches of `batch` items at a time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grouping {
    /// Items per batch (a shard's share of a batch in the loader).
    pub batch: usize,
    /// Batches per window; 0 = no grouping.
    pub window: usize,
}

/// Sorts each window of `g.window · g.batch` items of a shuffled order by length (stably, so
/// equal lengths keep their shuffled order), then shuffles the window's batch-sized chunks
/// with the stream (`seed`, [`Purpose::LengthGroups`], `base` ^ window index). A batch then
/// holds items of similar length, so dynamic padding wastes little, while which batch comes
/// when stays random. Every shard of a split uses the same chunk order (the stream has no
/// shard in it), so the rows one step takes from each shard share a length rank.
pub fn group_by_length<T: Copy>(
    items: &mut [T],
    len: impl Fn(T) -> usize,
    g: Grouping,
    seed: u64,
    base: u64,
) {
    if g.window == 0 || g.batch == 0 {
        return;
    }
    for (w, window) in items.chunks_mut(g.batch * g.window).enumerate() {
        window.sort_by_key(|&x| len(x));
        let mut chunks: Vec<Vec<T>> = window.chunks(g.batch).map(|c| c.to_vec()).collect();
        Stream::new(seed, Purpose::LengthGroups, base ^ w as u64).shuffle(&mut chunks);
        for (dst, src) in window.iter_mut().zip(chunks.iter().flatten()) {
            *dst = *src;
        }
    }
}

impl Loader {
    /// A loader of `split` over the shards `owned` (all shards for a single process),
    /// taking `per_shard` rows of each shard per batch; with `group_windows` > 0 each shard's
    /// order is grouped by length over windows of that many batches ([`group_by_length`]).
    pub fn new(
        ds: &Dataset,
        split: SplitKind,
        seed: u64,
        per_shard: usize,
        group_windows: usize,
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
        // Rows are read in a shuffled order.
        for &s in &owned {
            shards[s].advise_random();
        }
        let cursors = vec![Cursor::default(); shards.len()];
        let group = Grouping { batch: per_shard, window: group_windows };
        let orders = owned.iter().map(|&s| order(seed, split, &shards[s], s, 0, group)).collect();
        Ok(Loader {
            split,
            seed,
            per_shard,
            group,
            owned,
            cursors,
            orders,
            limits: DocLimits::of(&ds.manifest().tokenizer),
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
            self.orders[k] = order(self.seed, self.split, &shards[s], s, self.cursors[s].epoch, self.group);
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
                    self.orders[k] = order(self.seed, self.split, shard, s, c.epoch, self.group);
                }
                let row = self.orders[k][c.pos as usize] as usize;
                c.pos += 1;
                let doc = shard.doc_checked(row, self.limits)?;
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
    let limits = DocLimits::of(&ds.manifest().tokenizer);
    let mut out = Vec::new();
    let mut batch = HostBatch::default();
    for shard in ds.shards(split) {
        for i in 0..shard.len() {
            let doc = shard.doc_checked(i, limits)?;
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Lengths 0..n in a shuffled order, as a loader's epoch order would give them.
    fn shuffled(n: u32) -> Vec<u32> {
        let mut v: Vec<u32> = (0..n).map(|i| (i * 37) % n).collect();
        Stream::new(9, Purpose::Shuffle, 0).shuffle(&mut v);
        v
    }

    /// Σ over batches of (longest row × rows): the tokens a padded batch computes on.
    fn padded(order: &[u32], batch: usize) -> usize {
        order.chunks(batch).map(|c| *c.iter().max().unwrap() as usize * c.len()).sum()
    }

    #[test]
    fn grouping_by_length_keeps_every_row_and_gives_each_batch_neighbouring_lengths() {
        let g = Grouping { batch: 4, window: 5 };
        let before = shuffled(103);
        let mut after = before.clone();
        group_by_length(&mut after, |x| x as usize, g, 7, 0);
        let mut sorted = after.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..103).collect::<Vec<_>>(), "a permutation of the rows");
        for (w, window) in after.chunks(20).enumerate() {
            // Each window holds the same rows as before, and each of its batches is a run of
            // consecutive ranks of the window's sorted lengths.
            let mut mine: Vec<u32> = before[w * 20..(w * 20 + window.len())].to_vec();
            mine.sort_unstable();
            let mut got = window.to_vec();
            got.sort_unstable();
            assert_eq!(got, mine, "window {w} keeps its own rows");
            for batch in window.chunks(4) {
                let lo = mine.iter().position(|x| x == batch.iter().min().unwrap()).unwrap();
                let mut b = batch.to_vec();
                b.sort_unstable();
                assert_eq!(b, mine[lo..lo + b.len()], "window {w}: batch {batch:?} is a run of ranks");
            }
        }
        assert!(padded(&after, 4) < padded(&before, 4) * 3 / 4, "grouping cuts padding");
        let mut again = before.clone();
        group_by_length(&mut again, |x| x as usize, g, 7, 0);
        assert_eq!(again, after, "deterministic");
        let mut other = before.clone();
        group_by_length(&mut other, |x| x as usize, g, 8, 0);
        assert_ne!(other, after, "another seed orders the batches differently");
        let ascending: Vec<u32> = after[..20].chunks(4).map(|c| *c.iter().min().unwrap()).collect();
        let mut s = ascending.clone();
        s.sort_unstable();
        assert_ne!(ascending, s, "the batches of a window are shuffled, not left short to long");
    }

    #[test]
    fn grouping_off_leaves_the_order_alone() {
        let before = shuffled(50);
        let mut after = before.clone();
        group_by_length(&mut after, |x| x as usize, Grouping { batch: 4, window: 0 }, 7, 0);
        assert_eq!(after, before);
    }
}
