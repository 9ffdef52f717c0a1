//! The processes that train one model together (METHODS.md §15): rank, world size and
//! local rank (from MPI under a launcher, or one process without one), gradient averaging
//! over the flat buffer in buckets, the embedding table's touched rows (sparse or dense),
//! global sums of scalars, gathers, barriers, the start-up agreement check, and the
//! watchdog that ends the whole job when a rank dies or hangs.
//!
//! Only this module touches MPI and NCCL. Every MPI collective either completes or ends the
//! job: a collective that has not completed after `dist.timeout_s` prints which rank it
//! waited for and calls `MPI_Abort`, so the callers see no communication errors.
//!
//! How the dense gradient travels is chosen once per run by [`Dist::bind`] (the same choice
//! on every rank): NCCL between GPUs (`nccl.rs`), or MPI on host memory — the CPU backend's
//! own buffers, or a GPU's staged through the host when NCCL is missing or ranks share a
//! GPU (NCCL refuses that). The embedding table's touched rows always travel over MPI on
//! the host (sparse or dense, whichever is cheaper).

#[cfg(feature = "mpi")]
mod comm;
#[cfg(feature = "cuda")]
pub mod nccl;

use std::ops::Range;
use std::sync::OnceLock;

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

/// What carries the dense gradient between ranks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CommBackend {
    /// NCCL when every rank trains on a GPU of its own and libnccl loads, else MPI.
    #[default]
    Auto,
    /// NCCL, or an error saying why it cannot be used. With one rank it still runs (an
    /// average over one GPU), which is how the NCCL path is checked on a single device.
    Nccl,
    /// MPI on host memory (a GPU's gradient staged through the host).
    Mpi,
}

/// The dense gradient's element type on the wire.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WireDtype {
    #[default]
    F32,
    /// Half the bytes: each rank's gradient rounded to bf16 (nearest even), summed in bf16
    /// arithmetic (each partial sum rounded), then ×1/W in f32 and rounded to bf16 again.
    /// NCCL and MPI compute the same thing in their own reduction orders: bit for bit on 1
    /// or 2 ranks, to bf16 precision beyond.
    Bf16,
}

/// `[dist]`: how ranks communicate. Only `allreduce_dtype = "bf16"` changes the numbers
/// beyond float rounding (sparse and dense table exchanges, NCCL and MPI in f32, sum the
/// same values, in orders that agree bit for bit on 2 ranks); none of it is part of a
/// checkpoint's config check, so a resumed run may change any of it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DistConfig {
    /// Gradient all-reduce bucket size in MiB (each bucket is one non-blocking all-reduce).
    pub bucket_mb: f64,
    pub table_exchange: TableExchange,
    /// NCCL or MPI for the dense gradient (see [`CommBackend`]).
    pub backend: CommBackend,
    /// `f32` or `bf16` on the wire (see [`WireDtype`]).
    pub allreduce_dtype: WireDtype,
    /// With NCCL, start averaging each encoder layer's gradient as soon as the step's last
    /// backward pass has finished it, while the pass goes on below (`false`: after the
    /// pass, for comparison). The MPI path always averages after the pass.
    pub overlap: bool,
    /// A collective that has not completed after this many seconds ends the job, naming
    /// the ranks that never reached it. It must exceed the longest time between two
    /// collectives (an evaluation, a checkpoint write).
    pub timeout_s: f64,
}

impl Default for DistConfig {
    fn default() -> Self {
        DistConfig {
            bucket_mb: 25.0,
            table_exchange: TableExchange::Auto,
            backend: CommBackend::Auto,
            allreduce_dtype: WireDtype::F32,
            overlap: true,
            timeout_s: 600.0,
        }
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
impl Elem for u16 {}
impl Elem for u8 {}

/// What [`Dist::check_job`] asks of the ranks when they disagree.
const SAME_JOB: &str =
    "Every rank must run the same dtrain binary on the same config (file and --set overrides) and \
                        the same prepared data";

/// The error for ranks whose `values` (every rank's, in rank order) differ from rank 0's,
/// entry k named `names[k]` and followed by `detail(rank, k)`; `Ok` when they all agree.
fn disagreement(
    all: &[Vec<u64>],
    names: &[&str],
    detail: impl Fn(usize, usize) -> String,
    rule: &str,
) -> Result<()> {
    let mut problems = Vec::new();
    for (r, v) in all.iter().enumerate().skip(1) {
        for (k, name) in names.iter().enumerate() {
            if v.get(k) != all[0].get(k) {
                problems.push(format!("rank {r}'s {name} differs from rank 0's{}", detail(r, k)));
            }
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(Error::Data(format!("the ranks disagree: {}. {rule}", problems.join("; "))))
    }
}

/// How the dense gradient travels in this run, as [`Dist::bind`] chose it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GradPath {
    /// One rank and nothing to do (f32 on the wire): no communication.
    Local,
    /// MPI on host memory; why NCCL is not used.
    Host(String),
    /// NCCL between the ranks' GPUs.
    Nccl,
}

/// What one rank reports for the choice of [`GradPath`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RankDevice {
    /// A hash of the rank's GPU's UUID, when it trains on a GPU.
    pub gpu: Option<u64>,
    /// Whether libnccl loads on the rank.
    pub nccl: bool,
}

/// The gradient's path for `want` given every rank's device (in rank order), the same on
/// every rank; `Err` says why `dist.backend = "nccl"` cannot be honoured.
pub fn choose_path(want: CommBackend, ranks: &[RankDevice]) -> std::result::Result<GradPath, String> {
    let world = ranks.len();
    if want == CommBackend::Mpi {
        return Ok(if world == 1 {
            GradPath::Local
        } else {
            GradPath::Host("dist.backend = \"mpi\"".into())
        });
    }
    let on_cpu: Vec<usize> = (0..world).filter(|&r| ranks[r].gpu.is_none()).collect();
    let no_lib: Vec<usize> = (0..world).filter(|&r| ranks[r].gpu.is_some() && !ranks[r].nccl).collect();
    let mut shared = Vec::new();
    for a in 0..world {
        for b in a + 1..world {
            if ranks[a].gpu.is_some() && ranks[a].gpu == ranks[b].gpu {
                shared.push(format!("ranks {a} and {b}"));
            }
        }
    }
    // "rank 2", "ranks 0, 3", or "all ranks".
    let ranks_named = |v: &[usize]| match v.len() {
        n if n == world && n > 1 => "all ranks".to_string(),
        1 => format!("rank {}", v[0]),
        _ => format!("ranks {}", v.iter().map(|r| r.to_string()).collect::<Vec<_>>().join(", ")),
    };
    let why = if !on_cpu.is_empty() {
        let verb = if on_cpu.len() == 1 { "trains" } else { "train" };
        Some(format!("{} {verb} on the CPU", ranks_named(&on_cpu)))
    } else if !no_lib.is_empty() {
        Some(format!("libnccl was not found on {}", ranks_named(&no_lib)))
    } else if !shared.is_empty() {
        Some(format!("{} share one GPU, which NCCL refuses", shared.join(", ")))
    } else {
        None
    };
    match (want, why) {
        (CommBackend::Nccl, Some(why)) => Err(format!("dist.backend = \"nccl\" cannot be used: {why}")),
        (CommBackend::Nccl, None) => Ok(GradPath::Nccl),
        (_, _) if world == 1 => Ok(GradPath::Local),
        (_, Some(why)) => Ok(GradPath::Host(why)),
        (_, None) => Ok(GradPath::Nccl),
    }
}

/// The all-reduce buckets of a buffer of `len` elements, at most `cap` each, last elements
/// first: the order in which a backward pass completes the flat buffer's tensors (the
/// layout puts the input side first), so that the first buckets can leave soonest.
pub fn bucket_ranges(len: usize, cap: usize) -> Vec<Range<usize>> {
    let cap = cap.max(1);
    let mut out = Vec::with_capacity(len.div_ceil(cap));
    let mut end = len;
    while end > 0 {
        let start = end.saturating_sub(cap);
        out.push(start..end);
        end = start;
    }
    out
}

/// Rounds each value to bf16 (nearest even).
pub fn round_bf16<F: Real>(v: &mut [F]) {
    for x in v {
        *x = F::of(f64::from(half::bf16::from_f32(x.f64() as f32).to_f32()));
    }
}

/// The sum of two bf16 values (bits) as bf16: the f32 sum (exact for bf16 inputs of close
/// magnitude, else rounded once) rounded to nearest even. The MPI path's bf16 reduction.
pub fn bf16_add(a: u16, b: u16) -> u16 {
    let (a, b) = (half::bf16::from_bits(a), half::bf16::from_bits(b));
    half::bf16::from_f32(a.to_f32() + b.to_f32()).to_bits()
}

/// This rank's local rank (the GPU it binds to) and where it came from: the launcher's
/// variable when one says it (`OMPI_COMM_WORLD_LOCAL_RANK` from Open MPI's mpirun,
/// `MPI_LOCALRANKID` from MPICH's Hydra, `SLURM_LOCALID` when srun started exactly these
/// `world` tasks — under an mpirun inside an allocation it is the batch step's, 0 on every
/// rank), else MPI's shared-memory split (`split`).
pub fn local_rank_from(
    env: impl Fn(&str) -> Option<String>,
    world: usize,
    split: usize,
) -> (usize, &'static str) {
    let num = |k: &str| env(k).and_then(|v| v.trim().parse::<usize>().ok());
    if let Some(r) = num("OMPI_COMM_WORLD_LOCAL_RANK") {
        return (r, "OMPI_COMM_WORLD_LOCAL_RANK");
    }
    if let Some(r) = num("MPI_LOCALRANKID") {
        return (r, "MPI_LOCALRANKID");
    }
    if let (Some(r), Some(n)) = (num("SLURM_LOCALID"), num("SLURM_STEP_NUM_TASKS")) {
        if n == world {
            return (r, "SLURM_LOCALID");
        }
    }
    (split, "the MPI shared-memory split")
}

/// The MPI library's own version line (`MPI_Get_library_version`, callable before MPI
/// starts).
#[cfg(feature = "mpi")]
pub fn mpi_library_version() -> String {
    match mpi::environment::library_version() {
        // Open MPI's string ends in its C terminator.
        Ok(v) => {
            v.trim_end_matches('\0').lines().next().unwrap_or("").trim().trim_end_matches(',').to_string()
        }
        Err(e) => format!("the library's version is unreadable ({e})"),
    }
}

/// This process's place among the processes of one job.
pub struct Dist {
    rank: usize,
    world: usize,
    local_rank: usize,
    /// Where `local_rank` came from.
    local_source: &'static str,
    cfg: DistConfig,
    /// The gradient's path, once [`Dist::bind`] has chosen it.
    path: OnceLock<GradPath>,
    /// The NCCL communicator, when the path is NCCL.
    #[cfg(feature = "cuda")]
    nccl: OnceLock<std::sync::Mutex<nccl::Nccl>>,
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

/// The launcher's variable and world size when this process is one of several ranks (a
/// size the launcher gives, above 1); `None` alone or where the size is not given.
pub fn launched_ranks() -> Option<(&'static str, usize)> {
    match launcher() {
        Some((var, Some(size))) if size > 1 => Some((var, size)),
        _ => None,
    }
}

impl Dist {
    /// One process on its own.
    pub fn single() -> Dist {
        Dist::alone(&DistConfig::default())
    }

    /// One process on its own, with `[dist]` settings `cfg` (`backend = "nccl"` still
    /// averages over a communicator of one; `allreduce_dtype = "bf16"` still rounds).
    pub fn alone(cfg: &DistConfig) -> Dist {
        Dist {
            rank: 0,
            world: 1,
            local_rank: 0,
            local_source: "one process",
            cfg: cfg.clone(),
            path: OnceLock::new(),
            #[cfg(feature = "cuda")]
            nccl: OnceLock::new(),
            step: Default::default(),
            #[cfg(feature = "mpi")]
            comm: None,
        }
    }

    /// The job this process belongs to: MPI when a launcher started it, else one process.
    pub fn from_env(cfg: &DistConfig) -> Result<Dist> {
        let Some((var, size)) = launcher() else {
            return Ok(Dist::alone(cfg));
        };
        #[cfg(feature = "mpi")]
        {
            let _ = (var, size);
            let c = comm::Comm::init(std::time::Duration::from_secs_f64(cfg.timeout_s))?;
            let (local_rank, local_source) =
                local_rank_from(|k| std::env::var(k).ok(), c.size(), c.local_rank());
            Ok(Dist {
                rank: c.rank(),
                world: c.size(),
                local_rank,
                local_source,
                cfg: cfg.clone(),
                path: OnceLock::new(),
                #[cfg(feature = "cuda")]
                nccl: OnceLock::new(),
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
            Ok(Dist::alone(cfg))
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

    /// The processes of this job on this node, this one included: they share its memory.
    pub fn local_size(&self) -> usize {
        #[cfg(feature = "mpi")]
        if let Some(c) = &self.comm {
            return c.local_size();
        }
        1
    }

    /// The gradient's path, once [`Dist::bind`] has chosen it.
    pub fn path(&self) -> Option<&GradPath> {
        self.path.get()
    }

    /// Chooses how the dense gradient travels for backend `be` (the same on every rank:
    /// each reports its GPU and whether libnccl loads) and, for NCCL, joins the
    /// communicator (rank 0 makes the unique id; MPI carries it to the others). Every rank
    /// calls it once, at the same point, before the first gradient average.
    pub fn bind<B: Backend>(&self, be: &B) -> Result<&GradPath> {
        if let Some(p) = self.path.get() {
            return Ok(p);
        }
        #[cfg(feature = "cuda")]
        let mine = match be.as_cuda() {
            Some(cu) => {
                RankDevice { gpu: Some(xxhash_rust::xxh3::xxh3_64(&cu.uuid()?)), nccl: nccl::present() }
            }
            None => RankDevice { gpu: None, nccl: false },
        };
        #[cfg(not(feature = "cuda"))]
        let mine = {
            let _ = be;
            RankDevice { gpu: None, nccl: false }
        };
        let all =
            self.all_gather("the GPU binding check", &[mine.gpu.map_or(0, |h| h | 1), u64::from(mine.nccl)]);
        let ranks: Vec<RankDevice> =
            all.iter().map(|v| RankDevice { gpu: (v[0] != 0).then_some(v[0]), nccl: v[1] != 0 }).collect();
        let mut path =
            choose_path(self.cfg.backend, &ranks).map_err(|e| Error::config("[dist]", "dist.backend", e))?;
        if path == GradPath::Local && self.cfg.allreduce_dtype == WireDtype::Bf16 {
            path = GradPath::Host("one rank: the gradient is only rounded to bf16".into());
        }
        #[cfg(feature = "cuda")]
        if path == GradPath::Nccl {
            path = self.join_nccl(be.as_cuda().expect("every rank is on a GPU"))?;
        }
        Ok(self.path.get_or_init(|| path))
    }

    /// Rank 0's unique id to every rank, then the communicator. A failure to make the id
    /// reaches every rank (so all fall back to MPI together under `auto`); a failure to
    /// join is an error (NCCL's initialisation is collective: the other ranks cannot go on).
    #[cfg(feature = "cuda")]
    fn join_nccl(&self, be: &crate::backend::cuda::Cuda) -> Result<GradPath> {
        let made = if self.rank == 0 { nccl::new_id() } else { Ok([0; nccl::ID_BYTES]) };
        let mut words = vec![u64::from(made.is_ok())];
        words.extend(
            made.as_ref()
                .unwrap_or(&[0; nccl::ID_BYTES])
                .chunks(8)
                .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes"))),
        );
        let got = self.all_gather("the NCCL unique id", &words).swap_remove(0);
        if got[0] == 0 {
            let why = made.err().unwrap_or_else(|| "rank 0 could not make NCCL's unique id".into());
            return match self.cfg.backend {
                CommBackend::Nccl => Err(Error::Device(format!("dist.backend = \"nccl\": {why}"))),
                _ => Ok(GradPath::Host(format!("NCCL is unusable on rank 0: {why}"))),
            };
        }
        let mut id = [0u8; nccl::ID_BYTES];
        for (c, w) in id.chunks_mut(8).zip(&got[1..]) {
            c.copy_from_slice(&w.to_le_bytes());
        }
        let comm = nccl::Nccl::new(be, self.rank, self.world, id).map_err(Error::Device)?;
        let _ = self.nccl.set(std::sync::Mutex::new(comm));
        Ok(GradPath::Nccl)
    }

    /// A line for the log: how gradients travel, and this rank's binding.
    pub fn describe_path(&self) -> String {
        let dtype = match self.cfg.allreduce_dtype {
            WireDtype::F32 => "f32",
            WireDtype::Bf16 => "bf16",
        };
        match self.path.get() {
            None | Some(GradPath::Local) => "one rank: no gradient communication".into(),
            Some(GradPath::Nccl) => format!(
                "{} ranks, gradients averaged by NCCL in {dtype}; rank 0 has local rank {} (from {})",
                self.world, self.local_rank, self.local_source
            ),
            Some(GradPath::Host(why)) => {
                format!("{} rank(s), gradients averaged by MPI on the host in {dtype} ({why})", self.world)
            }
        }
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

    /// Elements of `size` bytes per all-reduce bucket (`dist.bucket_mb`).
    #[cfg(any(feature = "mpi", feature = "cuda"))]
    fn bucket_cap(&self, size: usize) -> usize {
        ((self.cfg.bucket_mb * (1 << 20) as f64) as usize / size).max(1)
    }

    /// The all-reduce buckets of `len` elements of `size` bytes ([`bucket_ranges`] with
    /// `dist.bucket_mb`).
    #[cfg(feature = "mpi")]
    fn buckets(&self, len: usize, size: usize) -> Vec<Range<usize>> {
        bucket_ranges(len, self.bucket_cap(size))
    }

    /// Rank 0's lock on run directory `dir` ([`crate::fsutil::lock_run_dir`]), held while
    /// the returned file lives; every rank returns the same outcome (the other ranks hold
    /// no file).
    pub fn lock_run_dir(&self, dir: &std::path::Path, field: &str) -> Result<Option<std::fs::File>> {
        let mine = self.is_root().then(|| crate::fsutil::lock_run_dir(dir, field));
        let mut failed = [u64::from(matches!(mine, Some(Err(_))))];
        self.sum("the run directory's lock", &mut failed);
        match mine {
            Some(r) => r.map(Some),
            None if failed[0] > 0 => Err(Error::bad_file(dir, format!("rank 0 could not lock it ({field})"))),
            None => Ok(None),
        }
    }

    /// Sums `buf` over all ranks in place, in buckets; `what` names it in a timeout.
    pub fn sum<T: Elem>(&self, what: &str, buf: &mut [T]) {
        #[cfg(feature = "mpi")]
        if let Some(c) = &self.comm {
            c.sum(&self.label(what), buf, &self.buckets(buf.len(), std::mem::size_of::<T>()));
        }
        let _ = (what, buf);
    }

    /// Sums bf16 values (their bits, `half::bf16::to_bits`) over all ranks in place, in
    /// bf16 arithmetic ([`bf16_add`] at each step of the reduction), in buckets.
    pub fn sum_bf16(&self, what: &str, buf: &mut [u16]) {
        #[cfg(feature = "mpi")]
        if let Some(c) = &self.comm {
            c.sum_bf16(&self.label(what), buf, &self.buckets(buf.len(), 2));
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

    /// Checks that every rank has the same `values`, named by `names`; the error names the
    /// ranks and what differs, and closes with `rule` (what the ranks must do).
    pub fn check_agree(&self, names: &[&str], values: &[u64], rule: &str) -> Result<()> {
        let all = self.all_gather("the start-up agreement check", values);
        disagreement(&all, names, |_, _| String::new(), rule)
    }

    /// Checks that every rank was given the same `--stop-after` (`None`: the whole run): a
    /// rank that stopped alone would leave the others waiting in the next step's collective.
    pub fn check_stop_after(&self, stop: Option<u64>) -> Result<()> {
        self.check_agree(
            &["--stop-after"],
            &[stop.unwrap_or(u64::MAX)],
            "Every rank must be given the same --stop-after (or none)",
        )
    }

    /// Checks that every rank resumes from the same checkpoint `dir` (none: a fresh start),
    /// by its name and its `DONE` record: a rank that sees another (a file system not shared
    /// between nodes, or another `--resume`) would train another model.
    pub fn check_resume(&self, dir: Option<&std::path::Path>) -> Result<()> {
        let mut key = Vec::new();
        if let Some(d) = dir {
            // A directory that is no checkpoint is named as what it is (a run's, a data
            // set's); the files' check is made once, and the loader's is then free.
            crate::checkpoint::check_written(d, crate::checkpoint::Reading::All)?;
            key.extend(d.file_name().map_or(Vec::new(), |n| n.as_encoded_bytes().to_vec()));
            key.push(0);
            let done = d.join(crate::checkpoint::DONE);
            key.extend(std::fs::read(&done).map_err(|e| Error::bad_file(&done, format!("reading: {e}")))?);
        }
        self.check_agree(
            &["checkpoint to resume from"],
            &[xxhash_rust::xxh3::xxh3_64(&key)],
            "Every rank must resume from the same checkpoint (or none): give train.out_dir on a file system \
             every node shares, and every rank the same --resume",
        )
    }

    /// Checks at start-up that every rank runs the same binary on the same config (its
    /// canonical JSON, whatever in it must agree) and the same prepared data (its manifest
    /// checksum); the error names the rank that differs and, for a config, the fields that
    /// differ from rank 0's with both values.
    pub fn check_job(&self, config_json: &str, data_checksum: &str) -> Result<()> {
        let values = [
            xxhash_rust::xxh3::xxh3_64(config_json.as_bytes()),
            xxhash_rust::xxh3::xxh3_64(data_checksum.as_bytes()),
            xxhash_rust::xxh3::xxh3_64(
                concat!(env!("CARGO_PKG_VERSION"), " ", env!("CARGO_PKG_NAME")).as_bytes(),
            ),
        ];
        let all = self.all_gather("the start-up agreement check", &values);
        // Every rank sees the hashes of all, so all of them join the second gather or none.
        let configs = if all.iter().any(|v| v.first() != all[0].first()) {
            self.all_gather("the ranks' configs, to name what differs", config_json.as_bytes())
        } else {
            Vec::new()
        };
        let parsed: Vec<Option<serde_json::Value>> =
            configs.iter().map(|c| serde_json::from_slice(c).ok()).collect();
        disagreement(
            &all,
            &["config (its file and --set overrides)", "data set (manifest checksum)", "dtrain version"],
            |rank, k| match (
                k,
                parsed.first().and_then(Option::as_ref),
                parsed.get(rank).and_then(Option::as_ref),
            ) {
                (0, Some(first), Some(this)) => {
                    let fields = crate::config::differences(first, this, 8);
                    if fields.is_empty() {
                        String::new()
                    } else {
                        format!(" (rank 0 → rank {rank}: {})", fields.join("; "))
                    }
                }
                _ => String::new(),
            },
            SAME_JOB,
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

/// Averaging a step's gradient over the ranks: the dense part in buckets along the path
/// [`Dist::bind`] chose (NCCL on the GPUs, or MPI on host memory: the CPU's buffers in
/// place, a GPU's staged through the host), the table's rows summed sparse or dense over
/// MPI, both scaled by 1/W (exact for W a power of two). Before `bind`, MPI on the host.
impl<B: Backend> GradSync<B> for Dist
where
    B::F: Elem,
{
    /// On the NCCL path (with `dist.overlap`), queues the buckets the backward pass has
    /// finished; elsewhere nothing (MPI makes no progress without calls, and the CPU's
    /// cores are busy with the backward pass anyway).
    fn ready(&self, be: &B, dense: &mut B::Buf, from: usize) {
        #[cfg(feature = "cuda")]
        if let (true, Some(GradPath::Nccl), Some(cu), Some(n)) =
            (self.cfg.overlap, self.path.get(), be.as_cuda(), self.nccl.get())
        {
            let bf16 = self.cfg.allreduce_dtype == WireDtype::Bf16;
            let buf = be.cuda_buf(dense).expect("a CUDA backend's buffer");
            let cap = self.bucket_cap(if bf16 { 2 } else { 4 });
            n.lock().unwrap_or_else(|e| e.into_inner()).launch_ready(cu, buf, from, cap, bf16);
        }
        let _ = (be, dense, from);
    }

    fn average(&self, be: &B, dense: &mut B::Buf, table: Option<&mut SparseRows<B::Buf>>, table_rows: usize) {
        let bf16 = self.cfg.allreduce_dtype == WireDtype::Bf16;
        match self.path.get() {
            Some(GradPath::Local) => return,
            None if self.world == 1 => return,
            #[cfg(feature = "cuda")]
            Some(GradPath::Nccl) => {
                let (Some(cu), Some(n)) = (be.as_cuda(), self.nccl.get()) else {
                    panic!("dist: the NCCL path was chosen for a backend that is not the CUDA one");
                };
                let buf = be.cuda_buf(dense).expect("a CUDA backend's buffer");
                let cap = self.bucket_cap(if bf16 { 2 } else { 4 });
                let timeout = std::time::Duration::from_secs_f64(self.cfg.timeout_s);
                if !n.lock().unwrap_or_else(|e| e.into_inner()).average(cu, buf, cap, bf16, timeout) {
                    eprintln!(
                        "dtrain rank {}: the NCCL gradient all-reduce at step {} did not complete within {} s \
                         (dist.timeout_s): a rank died or hangs, or the network failed; ending the job",
                        self.rank,
                        self.step.load(std::sync::atomic::Ordering::Relaxed),
                        self.cfg.timeout_s
                    );
                    self.abort(3);
                }
            }
            _ => {
                let inv = B::F::of(1.0 / self.world as f64);
                with_host_mut(be, dense, |d| {
                    if bf16 {
                        // Half the bytes: bf16 bits on the wire, summed in bf16.
                        let mut wire: Vec<u16> =
                            d.iter().map(|g| half::bf16::from_f32(g.f64() as f32).to_bits()).collect();
                        self.sum_bf16("the gradient all-reduce (bf16)", &mut wire);
                        for (g, w) in d.iter_mut().zip(&wire) {
                            *g = B::F::of(f64::from(half::bf16::from_bits(*w).to_f32())) * inv;
                        }
                        round_bf16(d);
                    } else {
                        self.sum("the gradient all-reduce", d);
                        d.iter_mut().for_each(|g| *g = *g * inv);
                    }
                });
            }
        }
        if self.world == 1 {
            return;
        }
        let inv = B::F::of(1.0 / self.world as f64);
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
        assert!(d.check_agree(&["config"], &[7], SAME_JOB).is_ok());
        let mut g = SparseRows { rows: vec![2, 5], values: vec![1.0f32, 2.0, 3.0, 4.0], dim: 2 };
        <Dist as GradSync<Cpu<f32>>>::average(&d, &Cpu::new(), &mut vec![1.0], Some(&mut g), 8);
        assert_eq!((g.rows.clone(), g.values.clone()), (vec![2, 5], vec![1.0, 2.0, 3.0, 4.0]));
    }

    fn gpu(id: u64) -> RankDevice {
        RankDevice { gpu: Some(id), nccl: true }
    }

    #[test]
    fn nccl_is_chosen_only_when_every_rank_has_a_gpu_of_its_own_and_the_library() {
        use CommBackend::{Auto, Mpi, Nccl};
        let cpu = RankDevice { gpu: None, nccl: false };
        assert_eq!(choose_path(Auto, &[gpu(1), gpu(2), gpu(3)]), Ok(GradPath::Nccl));
        assert_eq!(choose_path(Nccl, &[gpu(1), gpu(2)]), Ok(GradPath::Nccl));
        // One rank: nothing to exchange, unless NCCL is asked for (the single-GPU check).
        assert_eq!(choose_path(Auto, &[gpu(1)]), Ok(GradPath::Local));
        assert_eq!(choose_path(Nccl, &[gpu(1)]), Ok(GradPath::Nccl));
        assert_eq!(choose_path(Mpi, &[gpu(1), gpu(2)]), Ok(GradPath::Host("dist.backend = \"mpi\"".into())));
        assert_eq!(choose_path(Mpi, &[gpu(1)]), Ok(GradPath::Local));
        // Each reason names the ranks, under auto as the fallback's reason, under nccl as
        // the error.
        let cases: [(&[RankDevice], &str); 4] = [
            (&[cpu, cpu], "all ranks train on the CPU"),
            (&[gpu(1), cpu, gpu(2), cpu], "ranks 1, 3 train on the CPU"),
            (&[gpu(1), RankDevice { gpu: Some(2), nccl: false }], "libnccl was not found on rank 1"),
            (&[gpu(1), gpu(2), gpu(1)], "ranks 0 and 2 share one GPU, which NCCL refuses"),
        ];
        for (ranks, why) in cases {
            assert_eq!(choose_path(Auto, ranks), Ok(GradPath::Host(why.into())));
            let err = choose_path(Nccl, ranks).unwrap_err();
            assert!(err.starts_with("dist.backend = \"nccl\" cannot be used") && err.ends_with(why), "{err}");
        }
    }

    #[test]
    fn buckets_tile_the_buffer_last_elements_first() {
        assert_eq!(bucket_ranges(10, 4), vec![6..10, 2..6, 0..2]);
        assert_eq!(bucket_ranges(8, 4), vec![4..8, 0..4]);
        assert_eq!(bucket_ranges(3, 100), vec![0..3]);
        assert!(bucket_ranges(0, 4).is_empty());
        // A zero cap still makes progress (one element per bucket).
        assert_eq!(bucket_ranges(2, 0), vec![1..2, 0..1]);
        for (len, cap) in [(1000, 7), (1 << 20, 6_553_600), (12345, 12345)] {
            let b = bucket_ranges(len, cap);
            assert!(b.iter().all(|r| r.len() <= cap && !r.is_empty()));
            assert_eq!(b.iter().map(|r| r.len()).sum::<usize>(), len);
            assert!(b.windows(2).all(|w| w[0].start == w[1].end));
        }
    }

    /// `dist.bucket_mb` is what sizes the buckets (the two-rank test sees only that
    /// bucketing changes no value): 0.0001 MiB is 26 f32 or 52 bf16 elements.
    #[cfg(feature = "mpi")]
    #[test]
    fn bucket_mb_sizes_the_buckets() {
        let d = Dist::alone(&DistConfig { bucket_mb: 0.0001, ..Default::default() });
        assert_eq!((d.bucket_cap(4), d.bucket_cap(2)), (26, 52));
        assert_eq!(d.buckets(1000, 4).len(), 39);
        let d = Dist::alone(&DistConfig::default());
        assert_eq!(d.buckets(1000, 4).len(), 1);
    }

    #[test]
    fn the_local_rank_comes_from_the_launcher_that_knows_it() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| pairs.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string())
        };
        assert_eq!(
            local_rank_from(env(&[("OMPI_COMM_WORLD_LOCAL_RANK", "3")]), 8, 1),
            (3, "OMPI_COMM_WORLD_LOCAL_RANK")
        );
        assert_eq!(local_rank_from(env(&[("MPI_LOCALRANKID", "2")]), 8, 1), (2, "MPI_LOCALRANKID"));
        // srun started these 8 tasks: its local id holds.
        let srun = env(&[("SLURM_LOCALID", "5"), ("SLURM_STEP_NUM_TASKS", "8")]);
        assert_eq!(local_rank_from(srun, 8, 1), (5, "SLURM_LOCALID"));
        // mpirun inside an allocation: the batch step's SLURM_LOCALID (one task) is not ours.
        let batch = env(&[("SLURM_LOCALID", "0"), ("SLURM_STEP_NUM_TASKS", "1")]);
        assert_eq!(local_rank_from(batch, 8, 6), (6, "the MPI shared-memory split"));
        assert_eq!(local_rank_from(env(&[("OMPI_COMM_WORLD_LOCAL_RANK", "x")]), 2, 1).0, 1);
    }

    #[test]
    fn a_bf16_wire_rounds_to_nearest_even_and_f32_leaves_the_gradient_alone() {
        // 1 + 2^-8 lies halfway between two bf16 values and goes to the even one (1.0);
        // 1 + 3·2^-8 goes up to the even 1 + 2^-6.
        let mut v = vec![1.0f32 + 1.0 / 256.0, 1.0 + 3.0 / 256.0, -0.1, f32::MAX, 0.0];
        let want: Vec<f32> = v.iter().map(|&x| half::bf16::from_f32(x).to_f32()).collect();
        round_bf16(&mut v);
        assert_eq!(v, want);
        assert_eq!(&v[..2], &[1.0, 1.0 + 4.0 / 256.0]);
        let mut v64 = vec![0.1f64];
        round_bf16(&mut v64);
        assert_eq!(v64[0], f64::from(half::bf16::from_f32(0.1).to_f32()));

        // One process: f32 is no communication at all; bf16 rounds the dense gradient.
        let g: Vec<f32> = (0..50).map(|i| 0.01 * i as f32 + 1e-4).collect();
        for (dtype, path) in [
            (WireDtype::F32, GradPath::Local),
            (WireDtype::Bf16, GradPath::Host("one rank: the gradient is only rounded to bf16".into())),
        ] {
            let d = Dist::alone(&DistConfig { allreduce_dtype: dtype, ..Default::default() });
            let be = Cpu::<f32>::new();
            assert_eq!(d.bind(&be).unwrap(), &path);
            let mut buf = g.clone();
            <Dist as GradSync<Cpu<f32>>>::average(&d, &be, &mut buf, None, 0);
            let mut want = g.clone();
            if dtype == WireDtype::Bf16 {
                round_bf16(&mut want);
                assert_ne!(want, g);
            }
            assert_eq!(buf, want);
        }
    }

    #[test]
    fn bf16_sums_round_each_partial_sum_to_nearest_even() {
        let b = |x: f32| half::bf16::from_f32(x).to_bits();
        let f = |x: u16| half::bf16::from_bits(x).to_f32();
        assert_eq!(f(bf16_add(b(1.0), b(2.0))), 3.0);
        // 1 + 2^-8 is a tie between 1 and 1 + 2^-7: it goes to the even 1.
        assert_eq!(f(bf16_add(b(1.0), b(1.0 / 256.0))), 1.0);
        assert_eq!(f(bf16_add(b(1.0), b(3.0 / 256.0))), 1.0 + 1.0 / 64.0);
        assert_eq!(bf16_add(b(-0.5), b(0.5)), b(0.0));
        assert!(f(bf16_add(b(f32::NAN), b(1.0))).is_nan());
    }

    #[test]
    fn asking_for_nccl_without_a_gpu_names_the_field_and_the_reason() {
        let d = Dist::alone(&DistConfig { backend: CommBackend::Nccl, ..Default::default() });
        let e = d.bind(&Cpu::<f32>::new()).unwrap_err().to_string();
        assert!(e.contains("dist.backend") && e.contains("rank 0 trains on the CPU"), "{e}");
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
