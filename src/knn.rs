//! The k nearest neighbours of every row of a matrix, for `propagate`'s graph: by an exact
//! scan, or approximately through an inverted file of spherical k-means cells.
//!
//! # Definition
//! Rows are the n rows of an n×h matrix `v` (h may be 0); the similarity of rows i and j is
//! `v_i·v_j` plus what an `extra` term adds (`propagate`'s sparse TF-IDF views). A row's k
//! neighbours are the k rows j ≠ i of largest similarity among its candidates, most similar
//! first, ties to the smaller index.
//! - [`exact`]: every row is every row's candidate.
//! - [`by_cells`] ([`Search::Cells`]), the inverted file of Jégou, Douze and Schmid (2011),
//!   probed per row:
//!   - The m rows that have a vector (a nonzero entry) are split into `c` cells: `--cells`,
//!     or n's square root rounded, at least 1 and at most m ([`cell_count`]). A sample of
//!     `min(m, SAMPLE_PER_CELL·c)` of those rows, in the order of the seeded stream
//!     `Purpose::Cells`, trains the cells' centroids by spherical k-means: the sample's
//!     first c rows at unit length, then [`KMEANS_ROUNDS`] rounds of (each sample row to the
//!     centroid of largest dot product, first on a tie; each centroid the unit-length sum of
//!     its rows; a cell that got none, or whose rows sum to 0, keeps its centroid).
//!   - Each such row probes the `p = min(max(probes, 1), c)` cells whose centroids have the
//!     largest dot products with it (ties to the smaller index; `f32::total_cmp` orders
//!     them, −0 below +0), and is a member of the first. Where those p cells hold k members
//!     or fewer, the row probes the next nearest cells too, until they hold more or every
//!     cell is in (the report counts these rows as `extended`).
//!   - A row's candidates are the members of its probed cells and the rows without a
//!     vector (whose dense similarity is 0: only the extra term ranks them). A row without
//!     a vector takes every row as a candidate. With `probes ≥ c` every row is every row's
//!     candidate, and the result is [`exact`]'s, bit for bit where `extra` adds the same
//!     terms in the same order for both kinds of [`Candidates`].
//!   - The search runs group by group (a cell's members, or the rows without a vector): the
//!     rows probing it against its members, each row keeping its best k there; then each
//!     row's best k of its lists (padded with `(i, −∞)`, which makes no edge, where it has
//!     fewer than k other candidates). It goes in waves of rows whose partial lists hold
//!     at most [`WAVE_PAIRS`] pairs (256 MiB), at least one row's.
//!   - [`recall`] measures the loss: over a seeded sample of the rows with a vector (the
//!     others are searched exactly), the share of their exact neighbours of positive
//!     similarity at this k (the edges their own lists would give) that the search found.
//!
//! # Cost
//! The exact scan: n²·h multiply-adds (a million rows of one 100-wide view: 10.3 minutes on
//! 2 cores). The cells: about `SAMPLE_PER_CELL·c²·h` a k-means
//! round, `n·c·h` to place the rows (and `c·h` more for each row that probes further), and
//! about `n·h·probes·n/c` to search, more where the
//! cells' sizes differ (rows fall in the large cells more often): with c = √n and 16
//! probes, a million rows of one 100-wide view compared each row with 38k rows (3.8%) and
//! took 33 s on 2 cores at recall 0.76, 1.2 points of test accuracy below the exact scan's
//! labels (bench/results/propagate-cells.md). Both searches compare blocks of at most
//! [`QUERY_BLOCK`] rows with tiles of their candidates, a product of at most [`TILE_FLOATS`]
//! similarities (4 MiB) at a time, each row keeping its best k so far (one comparison a
//! candidate unless it enters the list, and runs of 64 below its k-th best skipped on their
//! largest key); a cells task also holds its candidates' rows, and a row's lists in its
//! several cells share a floor (the largest k-th best key any of them has reached), below
//! which candidates are not offered. Each row without a vector costs n comparisons as a
//! query and m as a candidate (no products: its dense similarities are 0). A group is one
//! task, so the most probed groups bound the parallelism. The results are the same for any
//! number of threads.

use std::sync::atomic::{AtomicI32, Ordering};

use rayon::prelude::*;

use crate::backend::Real;
use crate::error::{Error, Result};
use crate::rng::{Purpose, Stream};

/// The k-means sample's rows per cell.
pub const SAMPLE_PER_CELL: usize = 64;
/// Rounds of k-means.
pub const KMEANS_ROUNDS: usize = 10;
/// The probes of [`Search::Cells`] when none are given.
pub const DEFAULT_PROBES: usize = 16;
/// The rows [`recall`] samples.
pub const RECALL_ROWS: usize = 256;
/// A search compares at most this many rows at a time with a tile of candidates, and the
/// exact search gives a task at most this many rows.
const QUERY_BLOCK: usize = 1024;
/// A block of similarities (those rows against a tile of candidates) holds at most this many
/// floats (4 MiB), at least one row's to one candidate. The unit tests take small tiles, so
/// that their few hundred rows span many.
const TILE_FLOATS: usize = if cfg!(test) { 1 << 10 } else { 1 << 20 };

/// How the neighbours are searched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Search {
    /// Every row against every row.
    Exact,
    /// An inverted file of `cells` k-means cells (`None`: the rows' count's square root,
    /// rounded), each searching the rows of its `probes` nearest cells.
    Cells { cells: Option<usize>, probes: usize },
}

impl Search {
    /// The name `--search` takes.
    pub fn name(&self) -> &'static str {
        match self {
            Search::Exact => "exact",
            Search::Cells { .. } => "cells",
        }
    }

    /// Checks the counts before anything runs.
    pub fn check(&self) -> Result<()> {
        if let Search::Cells { cells, probes } = *self {
            if cells == Some(0) {
                return Err(Error::Data("--cells 0: there must be at least one cell".into()));
            }
            if probes == 0 {
                return Err(Error::Data(
                    "--probes 0: each cell searches at least itself, so at least 1".into(),
                ));
            }
        }
        Ok(())
    }
}

/// The candidates a similarity row covers: consecutive rows from `start` on (one per
/// similarity), or the listed ones.
#[derive(Debug, Clone, Copy)]
pub enum Candidates<'a> {
    Span(usize),
    Among(&'a [u32]),
}

impl Candidates<'_> {
    /// The row whose similarity is the row's `x`th.
    pub fn row(&self, x: usize) -> usize {
        match *self {
            Candidates::Span(start) => start + x,
            Candidates::Among(ids) => ids[x] as usize,
        }
    }
}

/// What the cells were like.
#[derive(Debug, Clone, PartialEq)]
pub struct CellsReport {
    /// The cells the rows with a vector were split into.
    pub cells: usize,
    /// The cells each row probed (more for the `extended` rows).
    pub probes: usize,
    /// The rows whose `probes` nearest cells held k rows or fewer, which probed more.
    pub extended: usize,
    /// The rows of the largest cell.
    pub largest: usize,
    /// The rows without a vector (searched against every row, and every row's candidates).
    pub blank: usize,
    /// The mean number of candidates a row was compared with.
    pub mean_candidates: f64,
}

/// Whether a row has a vector (a nonzero entry).
pub fn has_vector(row: &[f32]) -> bool {
    row.iter().any(|&x| x != 0.0)
}

/// The rows of the n×h `v` with a vector, and those without (every row where h is 0).
fn split_blank(n: usize, v: &[f32], h: usize) -> (Vec<u32>, Vec<u32>) {
    (0..n as u32).partition(|&i| h > 0 && has_vector(row(v, h, i)))
}

/// `sim[r·ld + j] = q_r · w_j` for the `m` rows of `q` and the rows of `w` (both width h).
fn dots(q: &[f32], w: &[f32], h: usize, sim: &mut [f32], ld: usize) {
    let (m, cols) = (q.len() / h, w.len() / h);
    if m == 0 || cols == 0 {
        return;
    }
    f32::gemm(m, h, cols, 1.0, q, (h as isize, 1), w, (1, h as isize), 0.0, sim, (ld as isize, 1));
}

/// The k most similar candidates of row `i`, given its similarities `sim` to `cands` (row
/// `i` itself skipped), most similar first, ties to the smaller index; padded with
/// `(i, −∞)` to k.
fn top_k(
    i: usize,
    cands: Candidates,
    sim: &[f32],
    k: usize,
    out: &mut [(u32, f32)],
    buf: &mut Vec<(u32, f32)>,
) {
    let mut best = Best::new(k, std::mem::take(buf));
    best.offer_all(i, cands, sim);
    best.write(i, out);
    *buf = best.list;
}

/// The best k candidates offered so far, most similar first, ties to the smaller index
/// (`f32::total_cmp` orders the similarities): a candidate costs one comparison with the
/// k-th best unless it enters the list.
struct Best {
    k: usize,
    list: Vec<(u32, f32)>,
    /// The k-th best's similarity as an integer of the same order, and its index: a
    /// candidate must beat them once the list is full (never beaten before).
    bar: (i32, u32),
    /// A key below which no candidate can be among the row's best k, known from elsewhere
    /// (the k-th best of the row's list in another cell): such candidates are not offered.
    floor: i32,
}

impl Best {
    fn new(k: usize, mut list: Vec<(u32, f32)>) -> Best {
        list.clear();
        Best { k, list, bar: (i32::MIN, u32::MAX), floor: i32::MIN }
    }

    /// Empties the list.
    fn clear(&mut self) {
        self.list.clear();
        self.bar = (i32::MIN, u32::MAX);
        self.floor = i32::MIN;
    }

    /// The k-th best's key, once the list is full.
    fn kth_key(&self) -> Option<i32> {
        (self.k > 0 && self.list.len() == self.k).then_some(self.bar.0)
    }

    /// `f32::total_cmp`'s order as an i32.
    fn key(s: f32) -> i32 {
        let b = s.to_bits() as i32;
        b ^ (((b >> 31) as u32) >> 1) as i32
    }

    /// Offers candidate j of similarity s.
    #[inline(always)]
    fn offer(&mut self, j: u32, s: f32) {
        let key = Best::key(s);
        if key >= self.floor && (key > self.bar.0 || (key == self.bar.0 && j < self.bar.1)) {
            self.enter(j, s);
        }
    }

    #[inline(never)]
    fn enter(&mut self, j: u32, s: f32) {
        if self.k == 0 {
            return;
        }
        if self.list.len() == self.k {
            self.list.pop();
        }
        let key = Best::key(s);
        let at = self.list.partition_point(|&(bj, bs)| {
            (Best::key(bs), std::cmp::Reverse(bj)) > (key, std::cmp::Reverse(j))
        });
        self.list.insert(at, (j, s));
        if self.list.len() == self.k {
            let (wj, ws) = self.list[self.k - 1];
            self.bar = (Best::key(ws), wj);
        }
    }

    /// Offers row i's candidates `cands` of similarities `sim`, row i itself skipped.
    fn offer_all(&mut self, i: usize, cands: Candidates, sim: &[f32]) {
        match cands {
            Candidates::Span(start) => self.offer_each(i, sim, |x| start + x),
            Candidates::Among(ids) => self.offer_each(i, sim, |x| ids[x] as usize),
        }
    }

    /// [`Best::offer_all`] with candidate x's row `row(x)`: once the list is full, a run of
    /// 64 similarities none of which reaches the k-th best's is skipped on the largest of
    /// their keys (a reduction the compiler vectorises), not offered one by one.
    #[inline(always)]
    fn offer_each(&mut self, i: usize, sim: &[f32], row: impl Fn(usize) -> usize) {
        const RUN: usize = 64;
        for (c, run) in sim.chunks(RUN).enumerate() {
            let below = if self.list.len() == self.k { self.bar.0.max(self.floor) } else { self.floor };
            if run.iter().fold(i32::MIN, |m, &s| m.max(Best::key(s))) < below {
                continue;
            }
            for (x, &s) in run.iter().enumerate() {
                let j = row(c * RUN + x);
                if j != i {
                    self.offer(j as u32, s);
                }
            }
        }
    }

    /// The list into `out` (k pairs), padded with `(i, −∞)`.
    fn write(&self, i: usize, out: &mut [(u32, f32)]) {
        out[..self.list.len()].copy_from_slice(&self.list);
        out[self.list.len()..].fill((i as u32, f32::NEG_INFINITY));
    }
}

/// Each of the `n` rows' `k` most similar other rows by an exact scan: n×k (index,
/// similarity) pairs. `extra(i, Candidates::Span(start), sim_row, scratch)` adds to row i's
/// similarities with the rows start.. (a tile of them); `scratch` is the task's own, made
/// by `X::default()` for each group of queries and kept across their tiles (a place for
/// `extra` to keep what it prepares once for a tile); `done(r)` is told of every r rows
/// whose lists are done.
pub fn exact<E, X>(n: usize, v: &[f32], h: usize, k: usize, extra: E, done: &Done<'_>) -> Vec<(u32, f32)>
where
    E: Fn(usize, Candidates, &mut [f32], &mut X) + Sync,
    X: Default,
{
    let mut out = vec![(0u32, 0f32); n * k];
    let rows: Vec<u32> = (0..n as u32).collect();
    exact_rows(&rows, n, v, h, k, &extra, done, &mut out);
    out
}

/// What a search tells of its progress: rows whose lists are done.
pub type Done<'a> = dyn Fn(usize) + Sync + 'a;

/// [`exact`]'s lists of the rows `rows` alone, into `out` (rows.len()×k). Blocks of at most
/// [`QUERY_BLOCK`] rows run in parallel (at least four a thread where there are rows
/// enough), each against every row, tile by tile.
#[allow(clippy::too_many_arguments)]
fn exact_rows<E, X>(
    rows: &[u32],
    n: usize,
    v: &[f32],
    h: usize,
    k: usize,
    extra: &E,
    done: &Done<'_>,
    out: &mut [(u32, f32)],
) where
    E: Fn(usize, Candidates, &mut [f32], &mut X) + Sync,
    X: Default,
{
    if k == 0 {
        return;
    }
    let block = rows.len().div_ceil(4 * rayon::current_num_threads()).clamp(1, QUERY_BLOCK);
    out.par_chunks_mut(block * k).zip(rows.par_chunks(block)).for_each(|(dst, qs)| {
        search_group(v, h, n, k, qs, Candidates::Span(0), None, extra, dst);
        done(qs.len());
    });
}

/// Each of the `n` rows' `k` most similar other rows among its candidates in the cells
/// (the module's definition), and what the cells were like. `extra(i,
/// Candidates::Among(ids), sim_row, scratch)` adds to row i's similarities with the rows
/// `ids`; `done(r)` is told of every r rows whose lists are done.
#[allow(clippy::too_many_arguments)]
pub fn by_cells<E, X>(
    n: usize,
    v: &[f32],
    h: usize,
    k: usize,
    cells: Option<usize>,
    probes: usize,
    extra: E,
    done: &Done<'_>,
) -> (Vec<(u32, f32)>, CellsReport)
where
    E: Fn(usize, Candidates, &mut [f32], &mut X) + Sync,
    X: Default,
{
    by_cells_in_waves(n, v, h, k, cells, probes, &extra, done, WAVE_PAIRS)
}

/// A wave of [`by_cells`] holds at most this many partial (index, similarity) pairs
/// (256 MiB), and at least one row's.
pub const WAVE_PAIRS: usize = 1 << 25;

/// [`by_cells`] in waves of rows whose partial lists hold at most `wave_pairs` pairs (and at
/// least one row's).
#[allow(clippy::too_many_arguments)]
fn by_cells_in_waves<E, X>(
    n: usize,
    v: &[f32],
    h: usize,
    k: usize,
    cells: Option<usize>,
    probes: usize,
    extra: &E,
    done: &Done<'_>,
    wave_pairs: usize,
) -> (Vec<(u32, f32)>, CellsReport)
where
    E: Fn(usize, Candidates, &mut [f32], &mut X) + Sync,
    X: Default,
{
    let (with, blank) = split_blank(n, v, h);
    let c = cell_count(n, with.len(), cells);
    let p = probes.clamp(1, c);
    let centroids = if with.is_empty() { Vec::new() } else { kmeans(v, h, &with, c) };
    // Every row with a vector: its p nearest cells, the first its own.
    let near = top_centroids(v, h, &with, &centroids, p);
    let mut members: Vec<Vec<u32>> = vec![Vec::new(); c];
    for (&i, cells) in with.iter().zip(near.chunks(p)) {
        members[cells[0] as usize].push(i);
    }
    // The rows without a vector (`blank`) are one more group, every row's candidates.
    // Each row's probed cells as compressed rows over the places in `with`: its p cells, or
    // more where those hold k members or fewer (the next nearest, until they hold more or
    // every cell is in); then the group without a vector (index c) where it has rows.
    let held = |cells: &[u32]| cells.iter().map(|&b| members[b as usize].len()).sum::<usize>();
    let short: Vec<u32> = (0..with.len() as u32)
        .filter(|&at| p < c && held(&near[at as usize * p..(at as usize + 1) * p]) <= k)
        .collect();
    let longer: Vec<Vec<u32>> = short
        .par_iter()
        .map(|&at| {
            let every = top_centroids(v, h, &with[at as usize..at as usize + 1], &centroids, c);
            let mut rows = 0;
            let take = every.iter().take_while(|&&b| {
                let more = rows <= k;
                rows += members[b as usize].len();
                more
            });
            take.copied().collect()
        })
        .collect();
    let extended = short.len();
    let mut starts = Vec::with_capacity(with.len() + 1);
    let mut lists = Vec::with_capacity(with.len() * (p + 1));
    starts.push(0usize);
    let mut next_short = short.iter().zip(&longer).peekable();
    for at in 0..with.len() {
        match next_short.peek() {
            Some(&(&s, l)) if s as usize == at => {
                lists.extend_from_slice(l);
                next_short.next();
            }
            _ => lists.extend_from_slice(&near[at * p..(at + 1) * p]),
        }
        if !blank.is_empty() {
            lists.push(c as u32);
        }
        starts.push(lists.len());
    }
    drop(near);
    drop(longer);
    let groups = |b: usize| if b == c { blank.as_slice() } else { members[b].as_slice() };
    let mut out = vec![(0u32, 0f32); n * k];
    let mut compared = blank.len() * n;
    if k > 0 {
        // The rows with a vector, in waves.
        let mut first = 0;
        while first < with.len() {
            let mut last = first + 1;
            while last < with.len() && (starts[last + 1] - starts[first]) * k <= wave_pairs {
                last += 1;
            }
            compared +=
                search_wave(v, h, n, k, &with, &starts, &lists, first..last, c + 1, &groups, extra, &mut out);
            done(last - first);
            first = last;
        }
        let mut lists = vec![(0u32, 0f32); blank.len() * k];
        // Their dense similarities are 0: no product is needed.
        exact_rows(&blank, n, v, 0, k, extra, done, &mut lists);
        for (&i, list) in blank.iter().zip(lists.chunks(k)) {
            out[i as usize * k..(i as usize + 1) * k].copy_from_slice(list);
        }
    }
    let report = CellsReport {
        cells: c,
        probes: p,
        extended,
        largest: members.iter().map(Vec::len).max().unwrap_or(0),
        blank: blank.len(),
        mean_candidates: compared as f64 / n.max(1) as f64,
    };
    (out, report)
}

/// The cells of [`Search::Cells`] for `n` rows, `m` of them with a vector: as asked, or the
/// rows' count's square root rounded, at least 1 and at most m (1 where m is 0).
pub fn cell_count(n: usize, m: usize, cells: Option<usize>) -> usize {
    cells.unwrap_or_else(|| (n as f64).sqrt().round() as usize).clamp(1, m.max(1))
}

/// One wave of [`by_cells`]: the rows at places `wave` of `with`, each against the members
/// (`groups(b)`) of its probed groups (`lists[starts[at]..starts[at + 1]]`, of `g` groups in
/// all), cell by cell, each keeping its best k there; then each row's best k of its lists,
/// into `out` at its row. Returns the pairs compared.
#[allow(clippy::too_many_arguments)]
fn search_wave<'a, E, X>(
    v: &[f32],
    h: usize,
    n: usize,
    k: usize,
    with: &[u32],
    starts: &[usize],
    lists: &[u32],
    wave: std::ops::Range<usize>,
    g: usize,
    groups: &(impl Fn(usize) -> &'a [u32] + Sync),
    extra: &E,
    out: &mut [(u32, f32)],
) -> usize
where
    E: Fn(usize, Candidates, &mut [f32], &mut X) + Sync,
    X: Default,
{
    let base = starts[wave.start];
    // Each group's requests: (the row, where its list goes among the wave's lists, the
    // row's place in the wave).
    let mut asked: Vec<Vec<(u32, u32, u32)>> = vec![Vec::new(); g];
    for at in wave.clone() {
        for (slot, &b) in (starts[at]..starts[at + 1]).zip(&lists[starts[at]..starts[at + 1]]) {
            asked[b as usize].push((with[at], (slot - base) as u32, (at - wave.start) as u32));
        }
    }
    // Each row's floor, shared by its lists (see search_group).
    let floors: Vec<AtomicI32> = wave.clone().map(|_| AtomicI32::new(i32::MIN)).collect();
    let found: Vec<Vec<(u32, f32)>> = (0..g)
        .into_par_iter()
        .map(|b| {
            let queries: Vec<u32> = asked[b].iter().map(|&(i, _, _)| i).collect();
            let mine: Vec<&AtomicI32> = asked[b].iter().map(|&(_, _, w)| &floors[w as usize]).collect();
            let mut dst = vec![(0u32, 0f32); queries.len() * k];
            // The last group's rows have no vector: their dense similarities are 0.
            let dense = if b + 1 == g { 0 } else { h };
            search_group(
                v,
                dense,
                n,
                k,
                &queries,
                Candidates::Among(groups(b)),
                Some(&mine),
                extra,
                &mut dst,
            );
            dst
        })
        .collect();
    let mut partial = vec![(0u32, f32::NEG_INFINITY); (starts[wave.end] - base) * k];
    let mut compared = 0;
    for (b, lists) in found.into_iter().enumerate() {
        compared += asked[b].len() * groups(b).len();
        for (&(_, slot, _), list) in asked[b].iter().zip(lists.chunks(k)) {
            partial[slot as usize * k..(slot as usize + 1) * k].copy_from_slice(list);
        }
    }
    // Each row's best k of its lists (a row is a member of one group only, so no pair
    // appears twice).
    let merged: Vec<Vec<(u32, f32)>> = wave
        .clone()
        .into_par_iter()
        .map(|at| {
            let mine = &partial[(starts[at] - base) * k..(starts[at + 1] - base) * k];
            let ids: Vec<u32> = mine.iter().map(|x| x.0).collect();
            let sims: Vec<f32> = mine.iter().map(|x| x.1).collect();
            let mut list = vec![(0u32, 0f32); k];
            top_k(with[at] as usize, Candidates::Among(&ids), &sims, k, &mut list, &mut Vec::new());
            list
        })
        .collect();
    for (at, list) in wave.zip(merged) {
        let i = with[at] as usize;
        out[i * k..(i + 1) * k].copy_from_slice(&list);
    }
    compared
}

/// Row i of `v`.
fn row(v: &[f32], h: usize, i: u32) -> &[f32] {
    &v[i as usize * h..(i as usize + 1) * h]
}

/// The rows `ids` of `v`, side by side.
fn gather(v: &[f32], h: usize, ids: &[u32], out: &mut Vec<f32>) {
    out.clear();
    for &i in ids {
        out.extend_from_slice(row(v, h, i));
    }
}

/// The k lists of the rows `queries` among the candidates `cands` of the n rows, into `out`
/// (queries.len()×k), in the order of `queries` (`Candidates::Span(0)`: every row). Blocks
/// of at most [`QUERY_BLOCK`] queries meet tiles of the candidates, one product of at most
/// [`TILE_FLOATS`] similarities each, which are offered to each query's running list: the
/// tiles' rows stay in cache while a block is compared with them, and the result is the
/// same for any block and tile (each similarity is the same sum in the same order).
///
/// With `floors` (one per query), a query's list here skips the candidates below its floor
/// (the largest k-th best key another of its lists has published), and publishes its own
/// k-th best key when full. Lists then hold only what can be among the query's best k over
/// all its lists (the candidates of different lists being different rows): fewer pairs, and
/// the same best k of them, whatever the order the lists are made in.
#[allow(clippy::too_many_arguments)]
fn search_group<E, X>(
    v: &[f32],
    h: usize,
    n: usize,
    k: usize,
    queries: &[u32],
    cands: Candidates,
    floors: Option<&[&AtomicI32]>,
    extra: &E,
    out: &mut [(u32, f32)],
) where
    E: Fn(usize, Candidates, &mut [f32], &mut X) + Sync,
    X: Default,
{
    let m = match cands {
        Candidates::Span(start) => n - start,
        Candidates::Among(ids) => ids.len(),
    };
    if queries.is_empty() || k == 0 || m == 0 {
        out.chunks_mut(k.max(1)).zip(queries).for_each(|(o, &i)| o.fill((i, f32::NEG_INFINITY)));
        return;
    }
    let block = queries.len().min(QUERY_BLOCK);
    let tile = (TILE_FLOATS / block).clamp(1, m);
    let (mut q, mut w, mut scratch) = (Vec::new(), Vec::new(), X::default());
    let rows: &[f32] = match (cands, h > 0) {
        (Candidates::Span(start), _) => &v[start * h..],
        (Candidates::Among(ids), true) => {
            gather(v, h, ids, &mut w);
            &w
        }
        (Candidates::Among(_), false) => &[],
    };
    let mut sim = vec![0f32; block * tile];
    let mut best: Vec<Best> = (0..block).map(|_| Best::new(k, Vec::with_capacity(k))).collect();
    let floor = |x: usize| floors.map(|f| f[x].load(Ordering::Relaxed));
    for (b, qs) in queries.chunks(block).enumerate() {
        best.iter_mut().for_each(Best::clear);
        if h > 0 {
            gather(v, h, qs, &mut q);
        }
        for lo in (0..m).step_by(tile) {
            let hi = (lo + tile).min(m);
            let part = match cands {
                Candidates::Span(start) => Candidates::Span(start + lo),
                Candidates::Among(ids) => Candidates::Among(&ids[lo..hi]),
            };
            let sim = &mut sim[..qs.len() * (hi - lo)];
            if h > 0 {
                dots(&q, &rows[lo * h..hi * h], h, sim, hi - lo);
            } else {
                sim.fill(0.0);
            }
            for (r, ((s, &i), best)) in sim.chunks_mut(hi - lo).zip(qs).zip(&mut best).enumerate() {
                if let Some(f) = floor(b * block + r) {
                    best.floor = best.floor.max(f);
                }
                extra(i as usize, part, s, &mut scratch);
                best.offer_all(i as usize, part, s);
            }
        }
        for (r, (&i, best)) in qs.iter().zip(&best).enumerate() {
            if let (Some(f), Some(key)) = (floors, best.kth_key()) {
                f[b * block + r].fetch_max(key, Ordering::Relaxed);
            }
            best.write(i as usize, &mut out[(b * block + r) * k..(b * block + r + 1) * k]);
        }
    }
}

/// The `c` centroids (c×h, unit rows) of spherical k-means over a sample of the rows `with`
/// (the module's definition).
fn kmeans(v: &[f32], h: usize, with: &[u32], c: usize) -> Vec<f32> {
    let mut sample = with.to_vec();
    Stream::new(0, Purpose::Cells, 0).shuffle(&mut sample);
    sample.truncate(with.len().min(SAMPLE_PER_CELL.saturating_mul(c)));
    let mut centroids = Vec::with_capacity(c * h);
    for &i in &sample[..c] {
        centroids.extend(unit(row(v, h, i).iter().map(|&x| f64::from(x))).unwrap_or_else(|| vec![0.0; h]));
    }
    for _ in 0..KMEANS_ROUNDS {
        let home = top_centroids(v, h, &sample, &centroids, 1);
        // Summed in sample order, so that the result does not depend on the threads.
        let mut sums = vec![0f64; c * h];
        for (&i, &cell) in sample.iter().zip(&home) {
            for (s, &x) in sums[cell as usize * h..(cell as usize + 1) * h].iter_mut().zip(row(v, h, i)) {
                *s += f64::from(x);
            }
        }
        for (centroid, sum) in centroids.chunks_mut(h).zip(sums.chunks(h)) {
            if let Some(u) = unit(sum.iter().copied()) {
                centroid.copy_from_slice(&u);
            }
        }
    }
    centroids
}

/// `x` at unit length as f32, or `None` where it is 0.
fn unit(x: impl Iterator<Item = f64> + Clone) -> Option<Vec<f32>> {
    let norm = x.clone().map(|a| a * a).sum::<f64>().sqrt();
    (norm > 0.0).then(|| x.map(|a| (a / norm) as f32).collect())
}

/// For each of the rows `ids`, the `p` centroids (of the rows of `centroids`) of largest
/// dot product, the largest first, ties to the smaller index: ids.len() × p cells.
fn top_centroids(v: &[f32], h: usize, ids: &[u32], centroids: &[f32], p: usize) -> Vec<u32> {
    let c = centroids.len().checked_div(h).unwrap_or(0);
    if c == 0 || p == 0 {
        return vec![0; ids.len() * p];
    }
    let block = TILE_FLOATS.div_ceil(c).clamp(1, QUERY_BLOCK);
    let mut out = vec![0u32; ids.len() * p];
    out.par_chunks_mut(block * p).zip(ids.par_chunks(block)).for_each(|(dst, rows)| {
        let mut q = Vec::new();
        gather(v, h, rows, &mut q);
        let mut sim = vec![0f32; rows.len() * c];
        dots(&q, centroids, h, &mut sim, c);
        let mut best = Best::new(p, Vec::with_capacity(p));
        for (d, s) in dst.chunks_mut(p).zip(sim.chunks(c)) {
            best.clear();
            // No centroid is skipped: usize::MAX is no cell's index.
            best.offer_all(usize::MAX, Candidates::Span(0), s);
            d.iter_mut().zip(&best.list).for_each(|(d, &(b, _))| *d = b);
        }
    });
    out
}

/// The share of the exact neighbours of positive similarity (at this k) of
/// [`RECALL_ROWS`] rows with a vector (those searched among cells; the others are searched
/// exactly), drawn by the seeded stream `Purpose::Cells` (index 1), that `found` (n×k lists)
/// holds; `None` where those rows have no such neighbour.
pub fn recall<E, X>(n: usize, v: &[f32], h: usize, k: usize, found: &[(u32, f32)], extra: E) -> Option<f64>
where
    E: Fn(usize, Candidates, &mut [f32], &mut X) + Sync,
    X: Default,
{
    let mut rows = split_blank(n, v, h).0;
    Stream::new(0, Purpose::Cells, 1).shuffle(&mut rows);
    rows.truncate(RECALL_ROWS);
    rows.sort_unstable();
    let mut exact = vec![(0u32, 0f32); rows.len() * k];
    exact_rows(&rows, n, v, h, k, &extra, &|_| {}, &mut exact);
    let (mut want, mut got) = (0usize, 0usize);
    for (&i, list) in rows.iter().zip(exact.chunks(k.max(1))) {
        let mine = &found[i as usize * k..(i as usize + 1) * k];
        for &(j, _) in list.iter().filter(|&&(_, s)| s > 0.0) {
            want += 1;
            // A row tied with j in j's place counts as a miss: the figure errs low.
            got += usize::from(mine.iter().any(|&(x, _)| x == j));
        }
    }
    (want > 0).then(|| got as f64 / want as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn none(_: usize, _: Candidates, _: &mut [f32], _: &mut Vec<f32>) {}

    fn quiet(_: usize) {}

    /// `n` unit rows of width `h` around `groups` random centres (spread `noise`).
    fn clustered(n: usize, h: usize, groups: usize, noise: f32, seed: u64) -> Vec<f32> {
        let mut rng = Stream::new(seed, Purpose::Init, 0);
        let mut normal = || {
            // Irwin–Hall: the sum of 12 uniforms, centred, is near a standard normal.
            (0..12).map(|_| rng.below(1 << 20) as f32 / (1 << 20) as f32).sum::<f32>() - 6.0
        };
        let centres: Vec<f32> = (0..groups * h).map(|_| normal()).collect();
        let mut v = Vec::with_capacity(n * h);
        for i in 0..n {
            let g = i % groups;
            let row: Vec<f64> = (0..h).map(|d| f64::from(centres[g * h + d] + noise * normal())).collect();
            v.extend(unit(row.into_iter()).unwrap());
        }
        v
    }

    /// A stand-in for a sparse view, added alike for both kinds of candidates: 100 for a
    /// row j of 200..230 (the rows without a vector below) where `i % 7 == j % 7`, so that
    /// every row's nearest are rows without a vector.
    fn shared(i: usize, c: Candidates, sim: &mut [f32], _: &mut Vec<f32>) {
        let add = |j: usize, s: &mut f32| {
            if (200..230).contains(&j) && j % 7 == i % 7 {
                *s += 100.0;
            }
        };
        sim.iter_mut().enumerate().for_each(|(x, s)| add(c.row(x), s));
    }

    /// The one-pass selection against sorting every candidate: ties (to the smaller index,
    /// also where the candidates come unsorted), −0 below +0, infinities, rising and falling
    /// orders, fewer candidates than k, and the row itself skipped.
    #[test]
    fn top_k_matches_a_full_sort() {
        let mut rng = Stream::new(5, Purpose::Init, 0);
        let bits = |l: &[(u32, f32)]| l.iter().map(|p| (p.0, p.1.to_bits())).collect::<Vec<_>>();
        let by_sort = |i: usize, pairs: &[(u32, f32)], k: usize| {
            let mut all: Vec<(u32, f32)> = pairs.iter().copied().filter(|&(j, _)| j as usize != i).collect();
            all.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
            all.truncate(k);
            all.resize(k, (i as u32, f32::NEG_INFINITY));
            bits(&all)
        };
        for trial in 0..200 {
            let m = rng.below(40) as usize;
            let k = 1 + rng.below(12) as usize;
            let i = rng.below(45) as usize;
            let sim: Vec<f32> = (0..m)
                .map(|j| match trial % 4 {
                    0 => rng.below(5) as f32 - 2.0,
                    1 => j as f32,
                    2 => -(j as f32),
                    _ => [0.0, -0.0, 1.5, f32::INFINITY, f32::NEG_INFINITY][rng.below(5) as usize],
                })
                .collect();
            let mut ids: Vec<u32> = (0..m as u32).collect();
            rng.shuffle(&mut ids);
            let (mut got, mut buf) = (vec![(0u32, 0f32); k], Vec::new());
            let all: Vec<(u32, f32)> = (0..m as u32).zip(sim.iter().copied()).collect();
            top_k(i, Candidates::Span(0), &sim, k, &mut got, &mut buf);
            assert_eq!(bits(&got), by_sort(i, &all, k), "all, trial {trial}");
            let among: Vec<f32> = ids.iter().map(|&j| sim[j as usize]).collect();
            let pairs: Vec<(u32, f32)> = ids.iter().copied().zip(among.iter().copied()).collect();
            top_k(i, Candidates::Among(&ids), &among, k, &mut got, &mut buf);
            assert_eq!(bits(&got), by_sort(i, &pairs, k), "among, trial {trial}");
        }
    }

    /// The exact scan against brute force, over hundreds of rows so that it runs in several
    /// blocks; and probing every cell compares every pair: the same lists as the exact
    /// scan, ties (duplicated rows of small integers, so every dot product is exact) broken
    /// alike, also where some rows have no vector and an extra term links them, and in waves
    /// of a few rows each.
    #[test]
    fn cells_probing_every_cell_match_the_exact_scan() {
        let (n, h, k) = (600, 4, 6);
        assert!(n > 8 * TILE_FLOATS / QUERY_BLOCK.min(n), "the test should span several tiles");
        let mut rng = Stream::new(3, Purpose::Init, 0);
        let mut v: Vec<f32> = (0..n * h).map(|_| rng.below(7) as f32 - 3.0).collect();
        for r in 100..110 {
            let src: Vec<f32> = v[5 * h..6 * h].to_vec();
            v[r * h..(r + 1) * h].copy_from_slice(&src);
        }
        let want = exact(n, &v, h, k, none, &quiet);
        for i in 0..n {
            let mut all: Vec<(u32, f32)> = (0..n)
                .filter(|&j| j != i)
                .map(|j| (j as u32, (0..h).map(|d| v[i * h + d] * v[j * h + d]).sum::<f32>()))
                .collect();
            all.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
            assert_eq!(&want[i * k..(i + 1) * k], &all[..k], "exact, row {i}");
        }
        let (got, report) = by_cells(n, &v, h, k, Some(7), 7, none, &quiet);
        assert_eq!(got, want);
        assert_eq!((report.cells, report.probes, report.blank, report.extended), (7, 7, 0, 0));
        assert!((report.mean_candidates - n as f64).abs() < 1e-9, "{report:?}");
        assert_eq!(recall(n, &v, h, k, &got, none), Some(1.0));
        // Real-valued rows, whose dot products round: still the same bits.
        let real = clustered(n, h, 12, 0.5, 2);
        let want_real = exact(n, &real, h, k, none, &quiet);
        assert_eq!(by_cells(n, &real, h, k, Some(9), 9, none, &quiet).0, want_real);
        // Rows 200..230 without a vector, the extra term beside the dot products.
        v[200 * h..230 * h].fill(0.0);
        let want = exact(n, &v, h, k, shared, &quiet);
        for wave in [WAVE_PAIRS, 3 * k, 1] {
            let (got, report) = by_cells_in_waves(n, &v, h, k, Some(7), 9, &shared, &quiet, wave);
            assert_eq!((report.probes, report.blank), (7, 30));
            assert!((report.mean_candidates - n as f64).abs() < 1e-9, "{report:?}");
            assert_eq!(got, want, "waves of {wave} pairs");
        }
        // Every row's first neighbour is one of them, found through the extra term.
        assert!(want.chunks(k).all(|l| (200..230).contains(&l[0].0)));
    }

    /// On clustered rows a few probes find nearly every neighbour at a fraction of the
    /// comparisons, and the recall falls where one probe leaves neighbours out, so the
    /// recall measures something. The result depends neither on the threads nor on the
    /// waves.
    #[test]
    fn a_few_probes_find_most_neighbours_of_clustered_rows() {
        let (n, h, k) = (3000, 16, 10);
        let v = clustered(n, h, 40, 0.6, 9);
        let (got, report) = by_cells(n, &v, h, k, None, 8, none, &quiet);
        assert_eq!((report.cells, report.probes, report.extended), (55, 8, 0));
        assert!(report.mean_candidates < 0.3 * n as f64, "{report:?}");
        let r = recall(n, &v, h, k, &got, none).unwrap();
        assert!(r > 0.95, "recall {r} with 8 probes of 55 cells");
        let (one, _) = by_cells(n, &v, h, k, None, 1, none, &quiet);
        let r1 = recall(n, &v, h, k, &one, none).unwrap();
        assert!(r1 < r, "one probe {r1} against eight {r}");
        // Each list: other rows, most similar first, at their true similarities.
        for (i, list) in got.chunks(k).enumerate() {
            for (x, &(j, s)) in list.iter().enumerate() {
                let dot: f32 = row(&v, h, i as u32).iter().zip(row(&v, h, j)).map(|(a, b)| a * b).sum();
                assert!(j as usize != i && (s - dot).abs() < 1e-5, "row {i}: {list:?}");
                assert!(x == 0 || list[x - 1].1 >= s, "row {i}: {list:?}");
            }
        }
        let pool = |t| rayon::ThreadPoolBuilder::new().num_threads(t).build().unwrap();
        let a = pool(1).install(|| by_cells(n, &v, h, k, None, 8, none, &quiet));
        let b = pool(3).install(|| by_cells(n, &v, h, k, None, 8, none, &quiet));
        assert_eq!(a, b);
        assert_eq!(a.0, got);
        // In waves, telling of every row once.
        let told = std::sync::atomic::AtomicUsize::new(0);
        let count = |r: usize| {
            told.fetch_add(r, std::sync::atomic::Ordering::Relaxed);
        };
        let waves = by_cells_in_waves(n, &v, h, k, None, 8, &none, &count, 1000 * k);
        assert_eq!(waves.0, got);
        assert_eq!(told.into_inner(), n);
    }

    /// Cells too small for k neighbours: a row whose probed cells hold k rows or fewer probes
    /// the next nearest ones, so every row gets k real neighbours.
    #[test]
    fn rows_in_small_cells_probe_further() {
        let (n, h, k) = (200, 8, 6);
        let v = clustered(n, h, 10, 0.8, 4);
        let (got, report) = by_cells(n, &v, h, k, Some(100), 1, none, &quiet);
        assert_eq!((report.cells, report.probes), (100, 1));
        assert!(report.extended > 100, "{report:?}");
        for (i, list) in got.chunks(k).enumerate() {
            assert!(list.iter().all(|&(j, s)| j as usize != i && s.is_finite()), "row {i}: {list:?}");
        }
        assert!(recall(n, &v, h, k, &got, none).unwrap() > 0.3);
    }

    /// Rows without a vector are searched against every row and are every row's
    /// candidates; a row among fewer than k other candidates gets `(i, −∞)` after them.
    #[test]
    fn rows_without_vectors_and_short_candidate_lists() {
        let h = 2;
        // Rows 0..4 have vectors, 4 and 5 none.
        let v = [1.0f32, 0.0, 0.9, 0.1, 0.0, 1.0, 0.1, 0.9, 0.0, 0.0, 0.0, 0.0];
        let n = 6;
        // The extra term links row 4 with row 1 (and row 1 with row 4).
        let extra = |i: usize, c: Candidates, sim: &mut [f32], _: &mut Vec<f32>| {
            let pair = |j: usize| matches!((i, j), (4, 1) | (1, 4));
            sim.iter_mut().enumerate().for_each(|(x, s)| *s += if pair(c.row(x)) { 5.0 } else { 0.0 })
        };
        let told = std::sync::atomic::AtomicUsize::new(0);
        let count = |r: usize| {
            told.fetch_add(r, std::sync::atomic::Ordering::Relaxed);
        };
        let (got, report) = by_cells(n, &v, h, 2, Some(2), 1, extra, &count);
        assert_eq!(told.into_inner(), n, "every row told of once, those without a vector too");
        assert_eq!(report.blank, 2);
        assert_eq!(got[4 * 2], (1, 5.0), "row 4 finds row 1 through the extra term");
        assert_eq!(got[2], (4, 5.0), "row 1 finds row 4 among the rows without a vector");
        assert_eq!(got[5 * 2].1, 0.0, "row 5 has nothing but zeros");
        // More neighbours than other rows: padded.
        for (i, list) in exact(3, &v[..6], h, 3, none, &quiet).chunks(3).enumerate() {
            assert!(list[..2].iter().all(|&(j, s)| j as usize != i && s.is_finite()), "{list:?}");
            assert_eq!(list[2], (i as u32, f32::NEG_INFINITY));
        }
        let (short, _) = by_cells(3, &v[..6], h, 3, Some(2), 1, none, &quiet);
        for (i, list) in short.chunks(3).enumerate() {
            assert_eq!(list[2], (i as u32, f32::NEG_INFINITY), "{list:?}");
        }
    }

    #[test]
    fn counts_are_checked() {
        assert!(Search::Cells { cells: Some(0), probes: 4 }
            .check()
            .unwrap_err()
            .to_string()
            .contains("--cells 0"));
        assert!(Search::Cells { cells: None, probes: 0 }
            .check()
            .unwrap_err()
            .to_string()
            .contains("--probes 0"));
        assert!(Search::Cells { cells: None, probes: 1 }.check().is_ok());
    }
}
