//! The processes that train one model together (METHODS.md §15): rank, world size and
//! local rank (from MPI under a launcher, or one process without one), gradient averaging
//! over the flat buffer in buckets, the embedding table's touched rows (sparse or dense),
//! global sums of scalars, gathers, barriers, the start-up agreement check, and the
//! watchdog that ends the whole job when a rank dies or hangs.
//!
//! Only this module touches MPI. Every collective either completes or ends the job: a
//! collective that has not completed after `dist.timeout_s` prints which rank it waited
//! for and calls `MPI_Abort`, so the callers see no communication errors.

#[cfg(feature = "mpi")]
mod comm;

use serde::{Deserialize, Serialize};

use crate::backend::{with_host_mut, Backend, GradSync, Real, SparseRows};
use crate::error::{Error, Result};

/// How the embedding table's gradient rows travel between ranks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TableExchange {
    /// Whichever moves fewer bytes this step (decided identically on every rank).
    #[default]
    Auto,
    /// Every rank gathers every rank's touched rows and sums them.
    Sparse,
    /// A dense all-reduce of the whole table's gradient and a touched-row count.
    Dense,
}

/// `[dist]`: how ranks communicate. None of it changes the trajectory (sparse and dense
/// table exchanges sum the same numbers), so none of it is part of a checkpoint's config
/// check.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DistConfig {
    /// Gradient all-reduce bucket size in MiB (each bucket is one non-blocking all-reduce).
    pub bucket_mb: f64,
    pub table_exchange: TableExchange,
    /// A collective that has not completed after this many seconds ends the job, naming
    /// the ranks that never reached it. It must exceed the longest time between two
    /// collectives (an evaluation, a checkpoint write).
    pub timeout_s: f64,
}

impl Default for DistConfig {
    fn default() -> Self {
        DistConfig { bucket_mb: 25.0, table_exchange: TableExchange::Auto, timeout_s: 600.0 }
    }
}

impl DistConfig {
    /// The section's rules; `Err((field, rule))`.
    pub fn check(&self) -> std::result::Result<(), (&'static str, String)> {
        if !(self.bucket_mb > 0.0 && self.bucket_mb <= 4096.0) {
            return Err(("dist.bucket_mb", "must be in (0, 4096]".into()));
        }
        if !(self.timeout_s >= 1.0 && self.timeout_s <= 1e6) {
            return Err(("dist.timeout_s", "must be in [1, 1e6] seconds".into()));
        }
        Ok(())
    }
}

/// Element types that travel between ranks.
#[cfg(feature = "mpi")]
pub trait Elem: Copy + Default + Send + Sync + 'static + mpi::datatype::Equivalence {}
/// Element types that travel between ranks.
#[cfg(not(feature = "mpi"))]
pub trait Elem: Copy + Default + Send + Sync + 'static {}
impl Elem for f32 {}
impl Elem for f64 {}
impl Elem for u64 {}
impl Elem for u32 {}

/// This process's place among the processes of one job.
pub struct Dist {
    rank: usize,
    world: usize,
    local_rank: usize,
    cfg: DistConfig,
    /// The training step in progress, for the watchdog's messages.
    step: std::sync::atomic::AtomicU64,
    #[cfg(feature = "mpi")]
    comm: Option<comm::Comm>,
}

/// The environment variables by which launchers (Open MPI's mpirun, PMIx/srun, MPICH's
/// Hydra) tell a process it is one of several, with the world size where they give one.
fn launcher() -> Option<(&'static str, Option<usize>)> {
    for (var, size_var) in [
        ("OMPI_COMM_WORLD_SIZE", Some("OMPI_COMM_WORLD_SIZE")),
        ("PMIX_RANK", None),
        ("PMI_RANK", Some("PMI_SIZE")),
    ] {
        if std::env::var_os(var).is_some() {
            let size = size_var.and_then(|v| std::env::var(v).ok()).and_then(|s| s.parse().ok());
            return Some((var, size));
        }
    }
    None
}

impl Dist {
    /// One process on its own.
    pub fn single() -> Dist {
        Dist {
            rank: 0,
            world: 1,
            local_rank: 0,
            cfg: DistConfig::default(),
            step: Default::default(),
            #[cfg(feature = "mpi")]
            comm: None,
        }
    }

    /// The job this process belongs to: MPI when a launcher started it, else one process.
    pub fn from_env(cfg: &DistConfig) -> Result<Dist> {
        let Some((var, size)) = launcher() else {
            return Ok(Dist { cfg: cfg.clone(), ..Dist::single() });
        };
        #[cfg(feature = "mpi")]
        {
            let _ = (var, size);
            let c = comm::Comm::init(std::time::Duration::from_secs_f64(cfg.timeout_s))?;
            Ok(Dist {
                rank: c.rank(),
                world: c.size(),
                local_rank: c.local_rank(),
                cfg: cfg.clone(),
                step: Default::default(),
                comm: Some(c),
            })
        }
        #[cfg(not(feature = "mpi"))]
        {
            if size.is_some_and(|w| w > 1) || var == "PMIX_RANK" {
                return Err(Error::Data(format!(
                    "a launcher started this process as one of several ({var} is set), but this dtrain \
                     was built without the `mpi` feature: each process would train alone. Rebuild with \
                     `--features mpi`, or run a single process without mpirun/srun"
                )));
            }
            Ok(Dist { cfg: cfg.clone(), ..Dist::single() })
        }
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn world(&self) -> usize {
        self.world
    }

    /// The rank among the processes of this node (the GPU a rank binds to).
    pub fn local_rank(&self) -> usize {
        self.local_rank
    }

    /// Whether this process writes the shared files and prints.
    pub fn is_root(&self) -> bool {
        self.rank == 0
    }

    pub fn config(&self) -> &DistConfig {
        &self.cfg
    }

    /// Records the training step in progress (named when a collective times out).
    pub fn set_step(&self, step: u64) {
        self.step.store(step, std::sync::atomic::Ordering::Relaxed);
    }

    /// `what`, at the step in progress.
    #[cfg(feature = "mpi")]
    fn label(&self, what: &str) -> String {
        format!("{what} at step {}", self.step.load(std::sync::atomic::Ordering::Relaxed))
    }

    /// Elements per all-reduce bucket for elements of `size` bytes.
    #[cfg(feature = "mpi")]
    fn bucket_len(&self, size: usize) -> usize {
        ((self.cfg.bucket_mb * (1 << 20) as f64) as usize / size).max(1)
    }

    /// Sums `buf` over all ranks in place, in buckets; `what` names it in a timeout.
    pub fn sum<T: Elem>(&self, what: &str, buf: &mut [T]) {
        #[cfg(feature = "mpi")]
        if let Some(c) = &self.comm {
            c.sum(&self.label(what), buf, self.bucket_len(std::mem::size_of::<T>()));
        }
        let _ = (what, buf);
    }

    /// Every rank's `local`, in rank order.
    pub fn all_gather<T: Elem>(&self, what: &str, local: &[T]) -> Vec<Vec<T>> {
        #[cfg(feature = "mpi")]
        if let Some(c) = &self.comm {
            return c.all_gather(&self.label(what), local);
        }
        let _ = what;
        vec![local.to_vec()]
    }

    /// Waits until every rank has reached the same point.
    pub fn barrier(&self, what: &str) {
        #[cfg(feature = "mpi")]
        if let Some(c) = &self.comm {
            c.barrier(&self.label(what));
        }
        let _ = what;
    }

    /// Ends the whole job at once (every rank) with exit code `code`; a single process
    /// just exits.
    pub fn abort(&self, code: i32) -> ! {
        #[cfg(feature = "mpi")]
        if let Some(c) = &self.comm {
            c.abort(code);
        }
        std::process::exit(code)
    }

    /// Checks that every rank has the same `values` (hashes of the config, the data, the
    /// binary), named by `names`; the error names the ranks and what differs.
    pub fn check_same(&self, names: &[&str], values: &[u64]) -> Result<()> {
        let all = self.all_gather("the start-up agreement check", values);
        let mut problems = Vec::new();
        for (r, v) in all.iter().enumerate().skip(1) {
            for (k, name) in names.iter().enumerate() {
                if v.get(k) != all[0].get(k) {
                    problems.push(format!("rank {r}'s {name} differs from rank 0's"));
                }
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(Error::Data(format!(
                "the ranks disagree: {}. Every rank must run the same dtrain binary on the same config \
                 (file and --set overrides) and the same prepared data",
                problems.join("; ")
            )))
        }
    }

    /// Checks at start-up that every rank runs the same binary on the same config (its
    /// canonical JSON, whatever in it must agree) and the same prepared data (its manifest
    /// checksum); the error names the rank that differs.
    pub fn check_job(&self, config_json: &str, data_checksum: &str) -> Result<()> {
        self.check_same(
            &["config (its file and --set overrides)", "data set (manifest checksum)", "dtrain version"],
            &[
                xxhash_rust::xxh3::xxh3_64(config_json.as_bytes()),
                xxhash_rust::xxh3::xxh3_64(data_checksum.as_bytes()),
                xxhash_rust::xxh3::xxh3_64(
                    concat!(env!("CARGO_PKG_VERSION"), " ", env!("CARGO_PKG_NAME")).as_bytes(),
                ),
            ],
        )
    }

    /// The sorted union of every rank's sorted, unique `rows`.
    pub fn union_rows(&self, rows: Vec<u32>) -> Vec<u32> {
        if self.world == 1 {
            return rows;
        }
        let mut all: Vec<u32> = self.all_gather("the step's touched table rows", &rows).concat();
        all.sort_unstable();
        all.dedup();
        all
    }

    /// Sums a sparse table gradient over ranks (the sorted union of the touched rows, each
    /// row the sum of the ranks' rows, in rank order); `table_rows`: the table's rows, for
    /// the dense exchange. Returns whether the dense exchange was used.
    pub fn sum_rows<F: Real + Elem>(&self, grad: &mut SparseRows<Vec<F>>, table_rows: usize) -> bool {
        if self.world == 1 {
            return false;
        }
        let dim = grad.dim;
        let counts: Vec<u64> =
            self.all_gather("the table gradient's row counts", &[grad.rows.len() as u64]).concat();
        let gathered: u64 = counts.iter().sum();
        // Bytes each rank receives: every rank's ids and rows; against a ring all-reduce of
        // the table and its counts (about twice the buffer).
        let sparse_bytes = gathered as f64 * (4.0 + (dim * std::mem::size_of::<F>()) as f64);
        let dense_bytes = 2.0 * table_rows as f64 * ((dim + 1) * std::mem::size_of::<F>()) as f64;
        let dense = match self.cfg.table_exchange {
            TableExchange::Sparse => false,
            TableExchange::Dense => true,
            TableExchange::Auto => dense_bytes < sparse_bytes,
        };
        if dense {
            let mut buf = vec![F::zero(); table_rows * (dim + 1)];
            let (values, touched) = buf.split_at_mut(table_rows * dim);
            for (i, &r) in grad.rows.iter().enumerate() {
                let r = r as usize;
                values[r * dim..(r + 1) * dim].copy_from_slice(&grad.values[i * dim..(i + 1) * dim]);
                touched[r] = F::one();
            }
            self.sum("the table gradient (dense)", &mut buf);
            let (values, touched) = buf.split_at(table_rows * dim);
            grad.rows = (0..table_rows as u32).filter(|&r| touched[r as usize] > F::zero()).collect();
            grad.values = grad
                .rows
                .iter()
                .flat_map(|&r| values[r as usize * dim..(r as usize + 1) * dim].iter().copied())
                .collect();
        } else {
            let ids = self.all_gather("the table gradient's rows", &grad.rows);
            let vals = self.all_gather("the table gradient's values", &grad.values);
            let mut union: Vec<u32> = ids.concat();
            union.sort_unstable();
            union.dedup();
            let mut out = vec![F::zero(); union.len() * dim];
            for (rows, v) in ids.iter().zip(&vals) {
                let mut at = 0;
                for (i, &r) in rows.iter().enumerate() {
                    // Both lists ascend: walk forward.
                    while union[at] != r {
                        at += 1;
                    }
                    for (o, &g) in out[at * dim..(at + 1) * dim].iter_mut().zip(&v[i * dim..(i + 1) * dim]) {
                        *o += g;
                    }
                }
            }
            grad.rows = union;
            grad.values = out;
        }
        dense
    }
}

/// Averaging a step's gradient over the ranks: the dense part summed in buckets, the
/// table's rows summed sparse or dense, both scaled by 1/W (exact for W a power of two).
/// On the CPU the buffers are summed in place; a device's are staged through host memory
/// (NCCL comes with its own issue).
impl<B: Backend> GradSync<B> for Dist
where
    B::F: Elem,
{
    fn average(&self, be: &B, dense: &mut B::Buf, table: Option<&mut SparseRows<B::Buf>>, table_rows: usize) {
        if self.world == 1 {
            return;
        }
        let inv = B::F::of(1.0 / self.world as f64);
        with_host_mut(be, dense, |d| {
            self.sum("the gradient all-reduce", d);
            d.iter_mut().for_each(|g| *g = *g * inv);
        });
        if let Some(t) = table {
            let mut host =
                SparseRows { rows: std::mem::take(&mut t.rows), values: be.download(&t.values), dim: t.dim };
            self.sum_rows(&mut host, table_rows);
            host.values.iter_mut().for_each(|g| *g = *g * inv);
            t.rows = host.rows;
            t.values = be.upload(&host.values);
        }
    }
}

/// Which of `shards` data shards rank `rank` of `world` owns: a contiguous block of
/// `shards / world`, so the ranks' parts of a global batch follow each other in rank order.
pub fn owned_shards(shards: usize, rank: usize, world: usize) -> Vec<usize> {
    let per = shards / world;
    (rank * per..(rank + 1) * per).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::Cpu;

    #[test]
    fn one_process_needs_no_launcher_and_its_collectives_are_identities() {
        let d = Dist::single();
        assert_eq!((d.rank(), d.world(), d.local_rank(), d.is_root()), (0, 1, 0, true));
        let mut v = vec![1.0f32, 2.0];
        d.sum("t", &mut v);
        assert_eq!(v, [1.0, 2.0]);
        assert_eq!(d.all_gather("t", &[3u64]), vec![vec![3u64]]);
        assert!(d.check_same(&["config"], &[7]).is_ok());
        let mut g = SparseRows { rows: vec![2, 5], values: vec![1.0f32, 2.0, 3.0, 4.0], dim: 2 };
        <Dist as GradSync<Cpu<f32>>>::average(&d, &Cpu::new(), &mut vec![1.0], Some(&mut g), 8);
        assert_eq!((g.rows.clone(), g.values.clone()), (vec![2, 5], vec![1.0, 2.0, 3.0, 4.0]));
    }

    #[test]
    fn shards_split_into_contiguous_blocks() {
        assert_eq!(owned_shards(8, 0, 1), (0..8).collect::<Vec<_>>());
        assert_eq!(owned_shards(8, 1, 2), vec![4, 5, 6, 7]);
        assert_eq!(owned_shards(8, 3, 4), vec![6, 7]);
    }

    #[test]
    fn bad_sections_name_their_field() {
        assert!(DistConfig::default().check().is_ok());
        let c = DistConfig { bucket_mb: 0.0, ..Default::default() };
        assert_eq!(c.check().unwrap_err().0, "dist.bucket_mb");
        let c = DistConfig { timeout_s: 0.1, ..Default::default() };
        assert_eq!(c.check().unwrap_err().0, "dist.timeout_s");
    }
}
