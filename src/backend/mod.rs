//! The compute interface every backend implements: the bag model's layer kernels and the
//! supervised loss, on buffers that live on the backend's device.
//!
//! Parameters and gradients are one flat buffer each (see `model::params`); an operation
//! names the tensors it reads or writes by their [`Slot`] in those buffers, which maps to a
//! slice on the CPU and to a device-pointer offset on CUDA. Every operation here is one
//! kernel launch (or a few) on a GPU; nothing returns to the host but what the signature
//! says. The CPU implementation (`cpu`) is the reference that every future kernel is tested
//! against.

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;

use std::fmt::Debug;

use serde::{Deserialize, Serialize};

use crate::algo::consistency::ConsistencyOp;
use crate::model::params::Slot;

/// The element type of a backend: `f32` for training, `f64` for gradient checks.
pub trait Real:
    num_traits::Float + Default + Debug + Send + Sync + std::iter::Sum + std::ops::AddAssign + 'static
{
    /// `c = alpha·a·b + beta·c` on row/column-strided matrices (`m×k` times `k×n`).
    #[allow(clippy::too_many_arguments)]
    fn gemm(
        m: usize,
        k: usize,
        n: usize,
        alpha: Self,
        a: &[Self],
        a_strides: (isize, isize),
        b: &[Self],
        b_strides: (isize, isize),
        beta: Self,
        c: &mut [Self],
        c_strides: (isize, isize),
    );
    /// Conversion from f64 constants.
    fn of(v: f64) -> Self;
    /// Conversion to f64 for reporting.
    fn f64(self) -> f64;
    /// The error function.
    fn erf(self) -> Self;
}

macro_rules! real_impl {
    ($t:ty, $gemm:path, $erf:path) => {
        impl Real for $t {
            fn gemm(
                m: usize,
                k: usize,
                n: usize,
                alpha: Self,
                a: &[Self],
                (rsa, csa): (isize, isize),
                b: &[Self],
                (rsb, csb): (isize, isize),
                beta: Self,
                c: &mut [Self],
                (rsc, csc): (isize, isize),
            ) {
                let span = |rows: usize, cols: usize, rs: isize, cs: isize| {
                    if rows == 0 || cols == 0 {
                        0
                    } else {
                        ((rows - 1) as isize * rs + (cols - 1) as isize * cs) as usize + 1
                    }
                };
                assert!(a.len() >= span(m, k, rsa, csa), "gemm: a too short");
                assert!(b.len() >= span(k, n, rsb, csb), "gemm: b too short");
                assert!(c.len() >= span(m, n, rsc, csc), "gemm: c too short");
                // SAFETY: the asserts above guarantee that every element the strides reach
                // lies inside its slice, and `c` does not alias `a` or `b` (it is `&mut`).
                unsafe {
                    $gemm(
                        m,
                        k,
                        n,
                        alpha,
                        a.as_ptr(),
                        rsa,
                        csa,
                        b.as_ptr(),
                        rsb,
                        csb,
                        beta,
                        c.as_mut_ptr(),
                        rsc,
                        csc,
                    )
                }
            }
            fn of(v: f64) -> Self {
                v as $t
            }
            fn f64(self) -> f64 {
                self as f64
            }
            fn erf(self) -> Self {
                $erf(self)
            }
        }
    };
}
real_impl!(f32, matrixmultiply::sgemm, erf_f32);
real_impl!(f64, matrixmultiply::dgemm, libm::erf);

/// erf for f32: a rational approximation x·P(x²)/Q(x²) on x clamped to [−4, 4] (beyond
/// it erf rounds to ±1 in f32), evaluated in f64 and rounded. Without branches or calls
/// it runs several times faster than `libm::erff` (which took 14% of an encoder step's
/// CPU time in a profile) and stays within 2 ulp of the correctly rounded erf (`erf_f32_is_within_2_ulp`).
/// The coefficients are those of Eigen's and XLA's single-precision erf.
fn erf_f32(x: f32) -> f32 {
    const P: [f64; 7] = [
        -2.72614225801306e-10,
        2.77068142495902e-08,
        -2.10102402082508e-06,
        -5.69250639462346e-05,
        -7.34990630326855e-04,
        -2.95459980854025e-03,
        -1.60960333262415e-02,
    ];
    const Q: [f64; 5] = [
        -1.45660718464996e-05,
        -2.13374055278905e-04,
        -1.68282697438203e-03,
        -7.37332916720468e-03,
        -1.42647390514189e-02,
    ];
    let x = f64::from(x).clamp(-4.0, 4.0);
    let x2 = x * x;
    let p = P.iter().fold(0.0, |acc, &c| acc * x2 + c);
    let q = Q.iter().fold(0.0, |acc, &c| acc * x2 + c);
    (x * p / q) as f32
}

/// Elementwise non-linearity of a hidden layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    Relu,
    /// GELU, tanh approximation.
    Gelu,
    Tanh,
    /// GELU exactly, x·Φ(x) with the error function (BERT's `gelu`).
    GeluErf,
}

/// The supervised loss of labeled rows.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum LossKind {
    /// Cross-entropy against `(1−ε)·onehot(y) + ε/C`.
    CrossEntropy { smoothing: f64 },
    /// Focal loss `−(1 − p_y)^γ · log p_y`; γ = 0 is cross-entropy.
    Focal { gamma: f64 },
}

/// Identifies one dropout mask. Masks are not stored: element `i` is kept iff a
/// counter-based hash of `(seed, step, site, pass, i)` clears the drop probability, so the
/// backward pass (and a GPU kernel) recomputes exactly the forward's mask.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DropoutKey {
    pub seed: u64,
    pub step: u64,
    /// Which dropout layer.
    pub site: u32,
    /// Which forward pass of the step (methods with two noisy passes use 0 and 1).
    pub pass: u32,
    /// Where each row of the buffer sits in the global sequence of rows its mask is keyed
    /// by. Element `j` of row `r` is hashed at index `rows.position(r)·width + j`, so a row's
    /// mask depends on its global position, not on how rows were batched or split over
    /// ranks (prediction passes the document's index in its input).
    pub rows: RowMap,
}

/// Dropout on attention probabilities (BERT's `attention_probs_dropout_prob`): element
/// (sequence i, head h, query t, key j) of P survives with probability 1 − `p`, hashed as
/// [`DropoutKey::keep`] at index (t·heads + h)·2^16 + j from the sequence's own base,
/// `mix64(base ^ mix64(g))` with g = `rows.sequence(i)` the sequence's global position (so
/// the mask depends neither on the batch's padded length nor on the ranks); survivors are
/// scaled by 1/(1 − p).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AttnDropout {
    pub p: f32,
    /// A [`DropoutKey::base`].
    pub base: u64,
    /// The sequences' global positions.
    pub rows: RowMap,
}

impl AttnDropout {
    /// The hash base of local sequence `i`.
    pub fn sequence_base(&self, i: usize) -> u64 {
        mix64(self.base ^ mix64(self.rows.sequence(i)))
    }

    /// The mask value of element `(t·heads + h)·2^16 + j` of the sequence whose base is
    /// `seq_base`: 0 or 1/(1 − p).
    pub fn factor(&self, seq_base: u64, index: u64) -> f32 {
        if DropoutKey::keep(seq_base, index, self.p) {
            1.0 / (1.0 - self.p)
        } else {
            0.0
        }
    }
}

/// The global position of each local row of a buffer: up to three segments of consecutive
/// local rows (a rank's labeled rows, then its unlabeled rows, …), each starting at its own
/// global position. One process places row `r` at `r`; rank `k` of `W` places its part of
/// each segment where that part sits in the global batch ([`RowMap::for_rank`]).
///
/// A buffer of token rows (an encoder's hidden states: `tokens` rows per sequence, the
/// batch's padded length) maps the segments over sequences, and row `r` (token
/// `r mod tokens` of sequence `r / tokens`) to `sequence(r / tokens)·2^16 + r mod tokens`:
/// a token's place does not depend on how far its batch was padded. Laid out as the
/// kernels' `struct Rows` (common.cuh).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RowMap {
    /// Local first row of each segment, ascending; `u32::MAX` for an unused segment.
    pub local: [u32; 3],
    /// Token rows per sequence; 0 when each row is a whole document or sequence.
    pub tokens: u32,
    /// Global position of each segment's first row.
    pub global: [u64; 3],
}

impl RowMap {
    /// Rows at `first`, `first + 1`, …
    pub const fn at(first: u64) -> RowMap {
        RowMap { local: [0, u32::MAX, u32::MAX], tokens: 0, global: [first, 0, 0] }
    }

    /// The rows of rank `rank` of `world` when the global buffer is the concatenation of
    /// segments whose local lengths (equal on every rank) are `lens`: segment `s` starts
    /// globally at `world·Σ_{s'<s} lens[s'] + rank·lens[s]`.
    pub fn for_rank(lens: &[usize], rank: usize, world: usize) -> RowMap {
        assert!(lens.len() <= 3, "at most three row segments");
        let mut m = RowMap { local: [u32::MAX; 3], tokens: 0, global: [0; 3] };
        let (mut local, mut global) = (0usize, 0usize);
        for (s, &len) in lens.iter().enumerate() {
            m.local[s] = local as u32;
            m.global[s] = (global + rank * len) as u64;
            local += len;
            global += world * len;
        }
        if lens.is_empty() {
            m = RowMap::at(0);
        }
        m
    }

    /// The same sequences, for a buffer of `tokens` token rows per sequence.
    pub fn per_token(self, tokens: usize) -> RowMap {
        assert!((1..=1 << 16).contains(&tokens), "{tokens} tokens per sequence: 1 to 65536 expected");
        RowMap { tokens: tokens as u32, ..self }
    }

    /// The global position of local row `r` (of a token row: see the type's docs).
    pub fn position(&self, r: usize) -> u64 {
        match self.tokens {
            0 => self.sequence(r),
            l => (self.sequence(r / l as usize) << 16) + (r % l as usize) as u64,
        }
    }

    /// The global position of local sequence (or document) `r`, by the segments alone.
    pub fn sequence(&self, r: usize) -> u64 {
        let r = r as u32;
        let s = if r >= self.local[2] {
            2
        } else if r >= self.local[1] {
            1
        } else {
            0
        };
        self.global[s] + u64::from(r - self.local[s])
    }
}

/// The precision of the linear layers' matrix products (`train.matmul`): which operands
/// the GEMMs read, always accumulating in f32 into f32 outputs. The weights stay f32 (the
/// master copy the optimizer updates); only the copies a product reads are rounded.
/// Attention's own products, the embeddings and every other operation stay f32.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Matmul {
    /// f32 operands (cuBLAS SGEMM; the CPU's exact product).
    #[default]
    F32,
    /// Operands rounded to TF32 (10 mantissa bits): tensor cores on the GPU
    /// (`CUBLAS_COMPUTE_32F_FAST_TF32`).
    Tf32,
    /// Operands rounded to bf16 (7 mantissa bits): bf16 tensor-core GEMMs with f32
    /// accumulation on the GPU (`cublasGemmEx`, CUDA_R_16BF inputs, f32 output).
    Bf16,
}

impl Matmul {
    /// Whether this is the default (full f32) precision.
    pub fn is_f32(&self) -> bool {
        *self == Matmul::F32
    }

    /// `x` as a product of this precision reads it, rounded to nearest even: the CPU's
    /// emulation of the GPU's operands (cuBLAS does not document TF32's rounding mode, so
    /// GPU results may differ from it by one TF32 unit per operand).
    pub fn round(self, x: f32) -> f32 {
        match self {
            Matmul::F32 => x,
            Matmul::Bf16 => half::bf16::from_f32(x).to_f32(),
            Matmul::Tf32 if !x.is_finite() => x,
            Matmul::Tf32 => {
                // Keep 10 of f32's 23 mantissa bits: add half a unit of the kept part (less
                // one when the kept part is even, so ties go to even) and clear the rest.
                let b = x.to_bits();
                let lsb = (b >> 13) & 1;
                f32::from_bits(b.wrapping_add(0x0fff + lsb) & !0x1fff)
            }
        }
    }
}

/// Where training steps run: `--device cpu | auto | cuda | cuda:N`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Device {
    /// The CPU backend (the default until the CUDA backend has been verified on a GPU).
    #[default]
    Cpu,
    /// CUDA device of the rank's local rank when the driver lists one, else the CPU.
    Auto,
    /// CUDA: device N, or the rank's local rank; an error when there is none.
    Cuda(Option<usize>),
}

impl std::str::FromStr for Device {
    type Err = String;

    fn from_str(s: &str) -> Result<Device, String> {
        match s {
            "cpu" => Ok(Device::Cpu),
            "auto" => Ok(Device::Auto),
            "cuda" => Ok(Device::Cuda(None)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(|n| Device::Cuda(Some(n)))
                .ok_or_else(|| format!("{s:?} is not a device: use cpu, auto, cuda or cuda:N")),
        }
    }
}

impl Device {
    /// The CUDA device ordinal to train on, or `None` for the CPU. When none is named, the
    /// rank's local rank picks it, modulo the devices this process sees (several ranks per
    /// GPU share them round-robin: `dist` then averages over MPI, as NCCL refuses that);
    /// `say` prints why `auto` chose the CPU.
    pub fn resolve(self, local_rank: usize, say: bool) -> crate::Result<Option<usize>> {
        match self {
            Device::Cpu => Ok(None),
            Device::Cuda(_) if !cfg!(feature = "cuda") => Err(crate::Error::Device(
                "--device cuda: this dtrain was built without the `cuda` feature".into(),
            )),
            Device::Cuda(n) => {
                let (count, why) = cuda_devices();
                match n {
                    _ if count == 0 => Err(crate::Error::Device(format!(
                        "--device {}: no CUDA device here ({why}); --device auto trains on a GPU where \
                         there is one and on the CPU otherwise, --device cpu on the CPU",
                        n.map_or("cuda".to_string(), |n| format!("cuda:{n}"))
                    ))),
                    Some(n) if n >= count => Err(crate::Error::Device(format!(
                        "--device cuda:{n}: the driver lists {count} device(s) for this process, cuda:0 to cuda:{}",
                        count - 1
                    ))),
                    Some(n) => Ok(Some(n)),
                    // The local rank's GPU among those this process sees: under Slurm's
                    // `--gpu-bind=single:1` each task sees one GPU, as device 0.
                    None => Ok(Some(local_rank % count)),
                }
            }
            Device::Auto => {
                let (count, why) = cuda_devices();
                if count == 0 {
                    if say {
                        eprintln!("--device auto: training on the CPU ({why})");
                    }
                    return Ok(None);
                }
                Ok(Some(local_rank % count))
            }
        }
    }
}

/// A job that runs on whichever backend `--device` picks (training, evaluation, prediction,
/// logits export): [`dispatch`] calls `run` with the concrete backend.
pub trait OnBackend {
    type Out;
    fn run<B: EncoderOps<F = f32>>(self, be: &B) -> crate::Result<Self::Out>;
}

/// Runs `job` on the backend `device` resolves to (see [`Device::resolve`]), with exact f32
/// products; a CPU job runs on a rayon worker (`cpu::on_worker`).
pub fn dispatch<J>(device: Device, local_rank: usize, say: bool, job: J) -> crate::Result<J::Out>
where
    J: OnBackend + Send,
    J::Out: Send,
{
    dispatch_with(device, local_rank, say, Matmul::F32, job)
}

/// [`dispatch`] with the linear layers' products at `matmul` precision.
pub fn dispatch_with<J>(
    device: Device,
    local_rank: usize,
    say: bool,
    matmul: Matmul,
    job: J,
) -> crate::Result<J::Out>
where
    J: OnBackend + Send,
    J::Out: Send,
{
    match device.resolve(local_rank, say)? {
        None => cpu::on_worker(|| job.run(&cpu::Cpu::<f32>::new().with_matmul(matmul))),
        #[cfg(feature = "cuda")]
        Some(ordinal) => job.run(&cuda::Cuda::new(ordinal)?.with_matmul(matmul)),
        #[cfg(not(feature = "cuda"))]
        Some(_) => unreachable!("Device::resolve gives no CUDA device without the cuda feature"),
    }
}

/// How many CUDA devices the driver lists, and why there are none.
fn cuda_devices() -> (usize, String) {
    #[cfg(feature = "cuda")]
    {
        let p = cuda::device::probe();
        let why = p.driver.err().unwrap_or_else(|| "the driver lists no device".into());
        (p.devices.len(), why)
    }
    #[cfg(not(feature = "cuda"))]
    (0, "this dtrain was built without the `cuda` feature".into())
}

/// A buffer's elements on the host: borrowed in place on the CPU, downloaded on a device.
pub fn host_view<'a, B: Backend>(be: &B, buf: &'a B::Buf) -> std::borrow::Cow<'a, [B::F]> {
    match be.host(buf) {
        Some(h) => std::borrow::Cow::Borrowed(h),
        None => std::borrow::Cow::Owned(be.download(buf)),
    }
}

/// Runs `f` on a buffer's elements on the host: in place on the CPU; on a device, on a
/// downloaded copy that is uploaded back afterwards.
pub fn with_host_mut<B: Backend, R>(be: &B, buf: &mut B::Buf, f: impl FnOnce(&mut [B::F]) -> R) -> R {
    if let Some(h) = be.host_mut(buf) {
        return f(h);
    }
    let mut v = be.download(buf);
    let r = f(&mut v);
    *buf = be.upload(&v);
    r
}

/// The index of the largest value of `row`, the lowest among ties (a row's predicted class).
pub fn argmax<F: PartialOrd>(row: &[F]) -> usize {
    (0..row.len()).fold(0, |b, c| if row[c] > row[b] { c } else { b })
}

/// splitmix64's finaliser: a bijective 64-bit mixer.
pub fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl DropoutKey {
    /// The per-mask base value hashed with each element index.
    pub fn base(&self) -> u64 {
        // Every bit of site and pass counts (an earlier form shifted `pass` by 56 and lost
        // all but its low 8 bits).
        let place = (u64::from(self.site) << 32) | u64::from(self.pass);
        mix64(self.seed ^ mix64(self.step ^ mix64(place)))
    }

    /// Whether element `i` survives dropout with probability `p` of dropping.
    pub fn keep(base: u64, i: u64, p: f32) -> bool {
        let u = (mix64(base ^ mix64(i)) >> 40) as f32 * (1.0 / (1u64 << 24) as f32);
        u >= p
    }
}

/// Averages one update's gradient over the processes that train a model together, before
/// the optimizer step: what the algorithms see of data parallelism (they never see a
/// communicator). `dist::Dist` implements it; [`Alone`] is one process.
pub trait GradSync<B: Backend> {
    /// Replaces `dense` and `table` (a table of `table_rows` rows) by their means over the
    /// processes; the table's rows become the union of every process's touched rows.
    fn average(&self, be: &B, dense: &mut B::Buf, table: Option<&mut SparseRows<B::Buf>>, table_rows: usize);

    /// Called during the step's last backward pass, before [`GradSync::average`]: the
    /// elements `from..` of `dense` are final for this step (the layers above are done), so
    /// their average may start while the pass goes on below. `average` must follow in the
    /// same step; it finishes what `ready` started. A no-op by default.
    fn ready(&self, _be: &B, _dense: &mut B::Buf, _from: usize) {}
}

/// One process: its gradient is the average.
pub struct Alone;

impl<B: Backend> GradSync<B> for Alone {
    fn average(&self, _: &B, _: &mut B::Buf, _: Option<&mut SparseRows<B::Buf>>, _: usize) {}
}

/// A batch of documents as the host builds it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostBatch {
    /// Feature ids of all documents, back to back.
    pub ids: Vec<u32>,
    /// `offsets[i]..offsets[i+1]` are document i's ids; `len = docs + 1`.
    pub offsets: Vec<u32>,
    /// Label per document; -1 for unlabeled.
    pub labels: Vec<i32>,
}

impl HostBatch {
    /// Number of documents.
    pub fn len(&self) -> usize {
        self.offsets.len().saturating_sub(1)
    }

    /// Whether the batch holds no document.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Appends every document of `other`.
    pub fn extend(&mut self, other: &HostBatch) {
        for i in 0..other.len() {
            let (a, b) = (other.offsets[i] as usize, other.offsets[i + 1] as usize);
            self.push(&other.ids[a..b], other.labels[i]);
        }
    }

    /// The documents `range` as a batch of their own.
    pub fn slice(&self, range: std::ops::Range<usize>) -> HostBatch {
        let mut out = HostBatch::default();
        for i in range {
            let (a, b) = (self.offsets[i] as usize, self.offsets[i + 1] as usize);
            out.push(&self.ids[a..b], self.labels[i]);
        }
        out
    }

    /// Appends one document.
    pub fn push(&mut self, ids: &[u32], label: i32) {
        if self.offsets.is_empty() {
            self.offsets.push(0);
        }
        self.ids.extend_from_slice(ids);
        self.offsets.push(self.ids.len() as u32);
        self.labels.push(label);
    }
}

/// The gradient of an embedding table: only the rows a batch touched.
#[derive(Debug)]
pub struct SparseRows<Buf> {
    /// Touched row ids, sorted ascending, unique (on the host: the optimizer needs them).
    pub rows: Vec<u32>,
    /// `rows.len() × dim` gradient values, row i for `rows[i]`.
    pub values: Buf,
    /// Row width.
    pub dim: usize,
}

/// Hyperparameters of one Adam-family update (AdamW, lazy Adam, LAMB).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamStep {
    /// Learning rate (schedule and per-tensor multiplier applied).
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Decoupled weight decay (AdamW, LAMB); lazy Adam on a table takes none.
    pub weight_decay: f64,
    /// 1-based step number, for the bias corrections `1 − β^t`.
    pub t: u64,
}

/// Hyperparameters of one SGD update.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SgdStep {
    pub lr: f64,
    /// Momentum μ (0: plain SGD, no buffer needed).
    pub momentum: f64,
    pub nesterov: bool,
    /// L2 weight decay added to the gradient.
    pub weight_decay: f64,
}

/// The optional per-class and per-row inputs of [`Backend::consistency`].
#[derive(Debug)]
pub struct ConsistencyAux<'a, Buf> {
    /// Added to the target's logits (log-probabilities) after the temperature: `C` values
    /// (distribution alignment's log(π/p̃)).
    pub bias: Option<&'a Buf>,
    /// Per-class multipliers of the threshold τ: `C` values (FlexMatch, FreeMatch).
    pub class_threshold: Option<&'a Buf>,
    /// Per-row weights: `n` values, 0 drops a row (a Temporal Ensembling row with no target
    /// yet).
    pub row_weight: Option<&'a Buf>,
}

impl<Buf> Default for ConsistencyAux<'_, Buf> {
    fn default() -> Self {
        ConsistencyAux { bias: None, class_threshold: None, row_weight: None }
    }
}

/// What [`Backend::consistency`] returns to the host.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ConsistencyOut {
    /// Σ over rows of the masked loss (not multiplied by the op's scale).
    pub loss_sum: f64,
    /// Rows that passed the confidence mask (and had a nonzero weight).
    pub passed: usize,
}

impl<Buf> SparseRows<Buf> {
    /// An empty gradient of a table with rows of `dim`, holding `values` as its buffer.
    pub fn new(values: Buf, dim: usize) -> Self {
        SparseRows { rows: Vec::new(), values, dim }
    }
}

/// The operations of a compute backend. Buffers are `F` arrays on the device.
pub trait Backend: Sync {
    /// Element type.
    type F: Real;
    /// A device buffer of `F`.
    type Buf: Send + Sync;
    /// A batch uploaded to the device.
    type Batch: Send + Sync;

    /// A short name (`cpu`, `cuda:0`).
    fn name(&self) -> String;
    /// A zero-filled buffer.
    fn zeros(&self, len: usize) -> Self::Buf;
    /// The buffer's length in elements.
    fn buf_len(&self, buf: &Self::Buf) -> usize;
    /// A buffer holding `host`.
    fn upload(&self, host: &[Self::F]) -> Self::Buf;
    /// A buffer holding `host`, which it takes: a host backend keeps the vector itself, so a
    /// large table is never held twice.
    fn upload_vec(&self, host: Vec<Self::F>) -> Self::Buf {
        self.upload(&host)
    }
    /// The buffer's contents.
    fn download(&self, buf: &Self::Buf) -> Vec<Self::F>;
    /// Sets every element to zero.
    fn fill_zero(&self, buf: &mut Self::Buf);
    /// Copies a host batch to the device.
    fn upload_batch(&self, batch: &HostBatch) -> Self::Batch;
    /// The buffer's elements in place, when the buffer lives in host memory (the CPU);
    /// `None` on a device. [`host_view`] and [`with_host_mut`] use it to avoid copies.
    fn host<'a>(&self, _buf: &'a Self::Buf) -> Option<&'a [Self::F]> {
        None
    }
    /// The same, mutable.
    fn host_mut<'a>(&self, _buf: &'a mut Self::Buf) -> Option<&'a mut [Self::F]> {
        None
    }
    /// Whether this backend's buffers live in host memory (they share it with the process).
    fn is_host(&self) -> bool {
        self.host(&self.zeros(0)).is_some()
    }
    /// Waits until every operation queued so far has finished (a no-op on the CPU, whose
    /// operations finish before they return).
    fn synchronize(&self) {}
    /// This backend as the CUDA backend, for `dist`'s NCCL path (`None` elsewhere).
    #[cfg(feature = "cuda")]
    fn as_cuda(&self) -> Option<&cuda::Cuda> {
        None
    }
    /// `buf` as a CUDA buffer, for `dist`'s NCCL path (`None` elsewhere).
    #[cfg(feature = "cuda")]
    fn cuda_buf<'a>(&self, _buf: &'a mut Self::Buf) -> Option<&'a mut cudarc::driver::CudaSlice<f32>> {
        None
    }

    /// `out[i,:] = mean over document i's ids j of table[j,:]` (`n × dim`); an empty
    /// document gives a zero row.
    fn embedding_bag_forward(
        &self,
        params: &Self::Buf,
        table: Slot,
        batch: &Self::Batch,
        out: &mut Self::Buf,
    );
    /// The table's gradient for `dout` (`n × dim`) into `out` (its buffers are reused): each
    /// id of document i receives `dout[i,:] / len_i`, summed over occurrences, in a fixed
    /// order (deterministic).
    fn embedding_bag_backward(
        &self,
        batch: &Self::Batch,
        dout: &Self::Buf,
        dim: usize,
        out: &mut SparseRows<Self::Buf>,
    );

    /// The table's backward pass and plain SGD on it in one pass, without forming the
    /// gradient: for each document i in order and each of its ids j in order,
    /// `table[j,:] −= lr · dout[i,:] / len_i`. The same update as
    /// [`Backend::embedding_bag_backward`] then [`Backend::sparse_sgd`], up to the order
    /// of the float sums; deterministic, whatever the thread count.
    fn embedding_bag_sgd(
        &self,
        params: &mut Self::Buf,
        table: Slot,
        batch: &Self::Batch,
        dout: &Self::Buf,
        lr: f64,
    );

    /// `y = x·Wᵀ + b` with `x: n × in`, `W: out × in`, `y: n × out`.
    fn linear_forward(
        &self,
        x: &Self::Buf,
        n: usize,
        params: &Self::Buf,
        w: Slot,
        b: Slot,
        y: &mut Self::Buf,
    );
    /// Accumulates `dW += dyᵀ·x` and `db += Σ_rows dy` into `grads` (same layout as params)
    /// and, if asked, writes `dx = dy·W`.
    #[allow(clippy::too_many_arguments)]
    fn linear_backward(
        &self,
        x: &Self::Buf,
        n: usize,
        params: &Self::Buf,
        w: Slot,
        b: Slot,
        dy: &Self::Buf,
        grads: &mut Self::Buf,
        dx: Option<&mut Self::Buf>,
    );

    /// `y = act(x)` elementwise.
    fn activation_forward(&self, act: Activation, x: &Self::Buf, y: &mut Self::Buf);
    /// `dx = act'(x) ⊙ dy` elementwise (`x` is the activation's input).
    fn activation_backward(&self, act: Activation, x: &Self::Buf, dy: &Self::Buf, dx: &mut Self::Buf);

    /// In place on rows of `width`: zeroes dropped elements and scales kept ones by
    /// `1/(1−p)`. The same call is the backward pass (the mask is recomputed from `key`).
    fn dropout(&self, p: f32, key: DropoutKey, width: usize, x: &mut Self::Buf);

    /// Softmax of each row of `logits` (`n × classes`), the loss of each labeled row into
    /// `row_loss` (0 for unlabeled rows), and `dlogits = scale · ∂loss/∂logits`. Returns the
    /// sum of the row losses.
    #[allow(clippy::too_many_arguments)]
    fn softmax_loss(
        &self,
        logits: &Self::Buf,
        classes: usize,
        batch: &Self::Batch,
        loss: LossKind,
        scale: Self::F,
        dlogits: &mut Self::Buf,
        row_loss: &mut Self::Buf,
    ) -> f64;

    /// The fused consistency operation of METHODS.md §2 (`algo::consistency::row` on each
    /// row): student rows `s_row0..s_row0 + n` of `student` against rows `0..n` of
    /// `target` (`classes` wide; logits or probabilities as `op.form` says). Adds
    /// `op.scale·weight·∂ℓ/∂z_s` into the same rows of `dstudent` and, when given,
    /// `op.scale·weight·∂ℓ/∂z_t` into rows `0..n` of `dtarget`. Writes `rows` (3n values):
    /// each row's masked loss, then each row's confidence max q, then each row's label
    /// argmax q. One pass over the logits; on a GPU, one launch.
    #[allow(clippy::too_many_arguments)]
    fn consistency(
        &self,
        op: &ConsistencyOp,
        student: &Self::Buf,
        s_row0: usize,
        target: &Self::Buf,
        n: usize,
        classes: usize,
        aux: &ConsistencyAux<'_, Self::Buf>,
        dstudent: &mut Self::Buf,
        dtarget: Option<&mut Self::Buf>,
        rows: &mut Self::Buf,
    ) -> ConsistencyOut;

    /// The EMA update over `range` of two flat buffers: `shadow ← α·shadow + (1 − α)·params`
    /// (the Mean Teacher and EMA-weights update: read two values, write one).
    fn ema(&self, shadow: &mut Self::Buf, params: &Self::Buf, range: std::ops::Range<usize>, alpha: f64);
    /// The same update on rows of a table, each with its own factor: for each `rows[k]`,
    /// `shadow ← a_k·shadow + (1 − a_k)·params` (the lazy EMA of sparse rows, METHODS.md §6).
    /// Rows are unique.
    fn ema_rows(
        &self,
        shadow: &mut Self::Buf,
        params: &Self::Buf,
        table: Slot,
        rows: &[u32],
        factors: &[f64],
    );
    /// Copies `range` of `src` into `dst`.
    fn copy(&self, dst: &mut Self::Buf, src: &Self::Buf, range: std::ops::Range<usize>);

    /// Row-wise softmax of `logits` (`n × classes`) into `probs`.
    fn softmax(&self, logits: &Self::Buf, classes: usize, probs: &mut Self::Buf);

    /// Σ x² over `buf[range]`, accumulated in f64.
    fn sq_norm(&self, buf: &Self::Buf, range: std::ops::Range<usize>) -> f64;
    /// `buf[range] *= factor`.
    fn scale(&self, buf: &mut Self::Buf, range: std::ops::Range<usize>, factor: f64);
    /// `y += alpha·x` elementwise (equal lengths).
    fn axpy(&self, y: &mut Self::Buf, x: &Self::Buf, alpha: f64);

    /// AdamW on one tensor, one pass over `slot` of `params`, `grads`, `m`, `v`:
    /// `m = β₁m + (1−β₁)g; v = β₂v + (1−β₂)g²; p −= lr·(m̂/(√v̂ + ε) + wd·p)`.
    fn adamw(
        &self,
        params: &mut Self::Buf,
        grads: &Self::Buf,
        m: &mut Self::Buf,
        v: &mut Self::Buf,
        slot: Slot,
        h: AdamStep,
    );
    /// LAMB on one tensor: the AdamW direction `u = m̂/(√v̂ + ε) + wd·p`, scaled by the trust
    /// ratio `‖p‖/‖u‖` (1 when either norm is 0): `p −= lr·ratio·u`.
    fn lamb(
        &self,
        params: &mut Self::Buf,
        grads: &Self::Buf,
        m: &mut Self::Buf,
        v: &mut Self::Buf,
        slot: Slot,
        h: AdamStep,
    );
    /// SGD on one tensor: `g' = g + wd·p`; with momentum `b = μb + g'` and the step
    /// `g' + μb` (Nesterov) or `b`; `p −= lr·step`. `buf` is unused when μ = 0.
    fn sgd(&self, params: &mut Self::Buf, grads: &Self::Buf, buf: &mut Self::Buf, slot: Slot, h: SgdStep);
    /// Lazy (sparse) Adam on the rows of a table that `grad` touched: the Adam update of
    /// those rows only, with the global step `t` in the bias corrections and no weight decay.
    fn sparse_adam(
        &self,
        params: &mut Self::Buf,
        table: Slot,
        grad: &SparseRows<Self::Buf>,
        m: &mut Self::Buf,
        v: &mut Self::Buf,
        h: AdamStep,
    );
    /// Plain SGD on the touched rows of a table: `row −= lr·g`.
    fn sparse_sgd(&self, params: &mut Self::Buf, table: Slot, grad: &SparseRows<Self::Buf>, lr: f64);
    /// The sum of two sparse gradients of the same table (gradient accumulation).
    fn sparse_add(&self, a: SparseRows<Self::Buf>, b: &SparseRows<Self::Buf>) -> SparseRows<Self::Buf>;
}

/// The Transformer encoder's operations beyond [`Backend`]'s (the encoder issue): layer
/// normalisation and the attention core. The CPU implements them, and the CUDA backend
/// too (never run on a GPU yet).
pub trait EncoderOps: Backend {
    /// LayerNorm of the `n` rows (`width` wide) of `x`: `y = (x − μ)/√(σ² + ε)·γ + β`, with
    /// `γ`, `β` the slots `gamma`, `beta` of `params`; writes each row's μ and 1/√(σ² + ε)
    /// into `stats` (2n values) for the backward pass.
    #[allow(clippy::too_many_arguments)]
    fn layer_norm_forward(
        &self,
        x: &Self::Buf,
        n: usize,
        params: &Self::Buf,
        gamma: crate::model::params::Slot,
        beta: crate::model::params::Slot,
        eps: f64,
        y: &mut Self::Buf,
        stats: &mut Self::Buf,
    );
    /// The backward pass for `dy`: `dγ`, `dβ` added into the same slots of `grads`, and
    /// `dx` written.
    #[allow(clippy::too_many_arguments)]
    fn layer_norm_backward(
        &self,
        x: &Self::Buf,
        n: usize,
        params: &Self::Buf,
        gamma: crate::model::params::Slot,
        beta: crate::model::params::Slot,
        stats: &Self::Buf,
        dy: &Self::Buf,
        grads: &mut Self::Buf,
        dx: &mut Self::Buf,
    );
    /// Multi-head attention over `b` sequences of `l` tokens (`shape` = (b, l, heads)): `q`, `k`, `v` are `b·l`
    /// rows of `heads·d` values (head h in columns h·d..(h+1)·d). For each sequence and
    /// head, `P = softmax(Q·Kᵀ·scale)` over the keys whose `mask` (b·l values, 1 keep, 0
    /// padding) is set, and `ctx = (P ⊙ M)·V` in the same layout as `q`, where M is
    /// `dropout`'s inverted mask ([`AttnDropout`]; all ones without it). `probs` keeps P
    /// (b·heads·l·l, before dropout) for the backward pass.
    #[allow(clippy::too_many_arguments)]
    fn attention_forward(
        &self,
        q: &Self::Buf,
        k: &Self::Buf,
        v: &Self::Buf,
        mask: &Self::Buf,
        shape: (usize, usize, usize),
        scale: f64,
        dropout: Option<AttnDropout>,
        ctx: &mut Self::Buf,
        probs: &mut Self::Buf,
    );
    /// The backward pass for `dctx` (with the forward pass's `dropout`, whose mask it
    /// recomputes): writes `dq`, `dk`, `dv`.
    #[allow(clippy::too_many_arguments)]
    fn attention_backward(
        &self,
        q: &Self::Buf,
        k: &Self::Buf,
        v: &Self::Buf,
        probs: &Self::Buf,
        dctx: &Self::Buf,
        shape: (usize, usize, usize),
        scale: f64,
        dropout: Option<AttnDropout>,
        dq: &mut Self::Buf,
        dk: &mut Self::Buf,
        dv: &mut Self::Buf,
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `--device cuda` where no device is listed is refused naming the flag and the choices
    /// that run here (on a machine with a GPU, a device past the last is refused instead).
    #[test]
    #[cfg(feature = "cuda")]
    fn cuda_without_a_device_is_refused_naming_the_other_choices() {
        let (count, _) = cuda_devices();
        if count == 0 {
            for (d, flag) in
                [(Device::Cuda(None), "--device cuda:"), (Device::Cuda(Some(1)), "--device cuda:1:")]
            {
                let e = d.resolve(0, false).unwrap_err().to_string();
                assert!(e.contains(flag) && e.contains("--device auto") && e.contains("--device cpu"), "{e}");
            }
        } else {
            let e = Device::Cuda(Some(count)).resolve(0, false).unwrap_err().to_string();
            assert!(e.contains(&format!("lists {count} device(s)")), "{e}");
        }
        assert_eq!(Device::Cpu.resolve(0, false).unwrap(), None);
    }

    /// The fast f32 erf against f64 erf rounded to f32: at most 2 ulp apart on a fine grid
    /// over [−6, 6] (both tails included), odd, exact at 0 and ±1 beyond the clamp, NaN kept.
    /// libm's erff, the old implementation, is the control: it passes the same bound.
    #[test]
    fn erf_f32_is_within_2_ulp() {
        let ulps = |a: f32, b: f32| (a.to_bits() as i64 - b.to_bits() as i64).abs();
        let mut worst = (0, 0.0f32);
        for i in -600_000..=600_000 {
            let x = i as f32 * 1e-5;
            let want = libm::erf(f64::from(x)) as f32;
            let got = erf_f32(x);
            assert!(ulps(libm::erff(x), want) <= 2, "control at {x}");
            assert_eq!(got, -erf_f32(-x), "odd at {x}");
            if ulps(got, want) > worst.0 {
                worst = (ulps(got, want), x);
            }
        }
        assert!(worst.0 <= 2, "{} ulp at x = {}", worst.0, worst.1);
        assert_eq!(erf_f32(0.0), 0.0);
        assert_eq!((erf_f32(7.0), erf_f32(-30.0), erf_f32(f32::INFINITY)), (1.0, -1.0, 1.0));
        assert!(erf_f32(f32::NAN).is_nan());
        // Tiny arguments keep their relative accuracy (erf(x) ≈ 2x/√π).
        let tiny = 1e-20f32;
        assert!(ulps(erf_f32(tiny), (f64::from(tiny) * std::f64::consts::FRAC_2_SQRT_PI) as f32) <= 2);
    }

    /// TF32 and bf16 rounding: the kept mantissa bits, ties to even, infinities and NaN,
    /// and the half-unit bound.
    #[test]
    fn matmul_rounding_keeps_the_right_mantissa_bits_to_nearest_even() {
        use super::Matmul;
        let one = 1.0f32;
        // TF32: the unit after 1 is 2^-10; bf16: 2^-7.
        assert_eq!(Matmul::Tf32.round(one + 2f32.powi(-10)), one + 2f32.powi(-10));
        assert_eq!(Matmul::Tf32.round(one + 2f32.powi(-11)), one, "a tie goes to even");
        assert_eq!(
            Matmul::Tf32.round(one + 3.0 * 2f32.powi(-11)),
            one + 2.0 * 2f32.powi(-10),
            "a tie goes to even"
        );
        assert_eq!(Matmul::Tf32.round(one + 2f32.powi(-11) + 2f32.powi(-20)), one + 2f32.powi(-10));
        assert_eq!(Matmul::Bf16.round(one + 2f32.powi(-8)), one, "a tie goes to even");
        assert_eq!(Matmul::Bf16.round(-(one + 3.0 * 2f32.powi(-9))), -(one + 2f32.powi(-7)));
        assert_eq!(Matmul::F32.round(one + 2f32.powi(-20)), one + 2f32.powi(-20));
        // The largest finite f32 rounds up to infinity in both, as in hardware; NaN stays NaN.
        assert!(Matmul::Tf32.round(f32::NAN).is_nan() && Matmul::Bf16.round(f32::NAN).is_nan());
        assert_eq!(Matmul::Tf32.round(f32::INFINITY), f32::INFINITY);
        assert_eq!(Matmul::Tf32.round(f32::MAX), f32::INFINITY);
        // Relative error within half a unit over many values.
        let mut x = 0.1234567f32;
        for _ in 0..1000 {
            x = (x * 1.618034 + 0.377) % 7.0 - 3.5;
            for (m, bits) in [(Matmul::Tf32, 10), (Matmul::Bf16, 7)] {
                let r = m.round(x);
                assert!((r - x).abs() <= x.abs() * 2f32.powi(-bits - 1) * 1.0001, "{m:?} {x} -> {r}");
            }
        }
    }

    /// Two keys that differ in any one field, including the high bits of `pass` (a
    /// second forward pass sets bit 20), give different masks.
    #[test]
    fn every_key_field_changes_the_mask() {
        let key = DropoutKey { seed: 1, step: 5, site: 0, pass: 0, rows: RowMap::at(0) };
        let mask =
            |k: DropoutKey| -> Vec<bool> { (0..256).map(|i| DropoutKey::keep(k.base(), i, 0.5)).collect() };
        let m0 = mask(key);
        for other in [
            DropoutKey { seed: 2, ..key },
            DropoutKey { step: 6, ..key },
            DropoutKey { site: 1, ..key },
            DropoutKey { pass: 1, ..key },
            DropoutKey { pass: 1 << 20, ..key },
            DropoutKey { pass: 1 << 31, ..key },
        ] {
            assert_ne!(mask(other), m0, "{other:?}");
        }
        assert_eq!(mask(key), m0);
    }

    /// A token row's position is its sequence's position and its token, whatever the
    /// padded length: rank 1 of 2 (its sequences at global 2 and 3, padded to 4 tokens)
    /// puts token 3 of its second sequence where one process (all 4 sequences, padded to
    /// 9) puts token 3 of sequence 3.
    #[test]
    fn token_rows_are_placed_by_sequence_and_token_not_by_padding() {
        let one = RowMap::at(0).per_token(9);
        let rank1 = RowMap::for_rank(&[2], 1, 2).per_token(4);
        assert_eq!(rank1.position(4 + 3), one.position(3 * 9 + 3));
        assert_eq!(rank1.position(4 + 3), (3 << 16) + 3);
        assert_eq!(rank1.sequence(1), 3);
        // Plain rows are untouched by the token form.
        assert_eq!(RowMap::for_rank(&[2], 1, 2).position(1), 3);
        // Distinct (sequence, token) pairs get distinct positions.
        let all: std::collections::HashSet<u64> = (0..4 * 9).map(|r| one.position(r)).collect();
        assert_eq!(all.len(), 36);
    }

    /// Ranks place their rows where the single process has them: the union over ranks of
    /// each rank's positions is the one-process map, segment by segment.
    #[test]
    fn row_maps_of_all_ranks_tile_the_global_batch() {
        let lens = [3usize, 5, 2];
        for world in [1usize, 2, 4] {
            let mut seen = Vec::new();
            for rank in 0..world {
                let m = RowMap::for_rank(&lens, rank, world);
                seen.extend((0..10).map(|r| m.position(r)));
            }
            seen.sort_unstable();
            assert_eq!(seen, (0..10 * world as u64).collect::<Vec<_>>(), "world {world}");
        }
        let one = RowMap::for_rank(&lens, 0, 1);
        assert!((0..10).all(|r| one.position(r) == r as u64));
        let m = RowMap::for_rank(&lens, 1, 2);
        // Rank 1 of 2: its first segment at 3 (after rank 0's 3 rows), its second at
        // 2·3 + 5 = 11, its third at 2·(3 + 5) + 2 = 18.
        assert_eq!([m.position(0), m.position(3), m.position(8)], [3, 11, 18]);
        assert_eq!(RowMap::at(7).position(2), 9);
    }
}
