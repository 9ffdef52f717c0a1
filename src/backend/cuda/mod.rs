//! The CUDA backend: every [`Backend`] operation as a kernel from `kernels/*.cu` (compiled by
//! NVRTC when the backend is created) or a cuBLAS GEMM, on one stream of one device.
//!
//! **Status: this code has never run on a GPU.** It compiles everywhere (cudarc loads CUDA
//! at run time), its kernels compile under NVRTC in the test suite wherever libnvrtc is
//! found, and `tests/cuda.rs` compares every operation with its CPU twin — but no machine
//! with a GPU has run those tests yet. Treat results from it as unverified until they have.
//!
//! Shapes and semantics are those of the trait's documentation and of `backend::cpu`, the
//! reference. Buffers are `CudaSlice<f32>`; an operation whose CPU twin resizes its output
//! reallocates the output when its length differs. Device failures (out of memory, a
//! faulting launch) panic with a message naming the operation: the trait's operations
//! return no errors, as the CPU never fails; creating the backend ([`Cuda::new`]) is where
//! a missing driver, library or device is reported as an error.

pub mod device;

use std::collections::HashMap;
use std::sync::Arc;

use cudarc::cublas::sys::cublasOperation_t;
use cudarc::cublas::{CudaBlas, Gemm, GemmConfig};
use cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, DeviceRepr, LaunchConfig, PushKernelArg,
    ValidAsZeroBits,
};

use super::{
    Activation, AdamStep, AttnDropout, Backend, ConsistencyAux, ConsistencyOut, DropoutKey, HostBatch,
    LossKind, Matmul, RowMap, SgdStep, SparseRows,
};
use crate::algo::consistency::{ConsistencyKind, ConsistencyOp, TargetForm};
use crate::error::{Error, Result};
use crate::model::params::Slot;

/// Threads per block of the grid-stride kernels.
const THREADS: u32 = 256;
/// The most blocks a grid-stride kernel launches (each thread then loops).
const MAX_BLOCKS: u32 = 4096;

/// One CUDA device with its stream, cuBLAS handle and loaded kernels.
pub struct Cuda {
    ordinal: usize,
    stream: Arc<CudaStream>,
    blas: CudaBlas,
    funcs: HashMap<&'static str, CudaFunction>,
    /// Passed where a kernel's optional input is absent (with its `has_…` flag at 0).
    dummy: CudaSlice<f32>,
    /// The linear layers' GEMM precision (`train.matmul`).
    matmul: Matmul,
}

/// A batch on the device, with the grouping of its occurrences by table row that the
/// embedding bag's backward passes read (built once, on the host, at upload).
pub struct CudaBatch {
    n: usize,
    ids: CudaSlice<u32>,
    offsets: CudaSlice<u32>,
    labels: CudaSlice<i32>,
    /// The touched table rows, sorted and unique (the sparse gradient's row ids).
    rows: Vec<u32>,
    rows_dev: CudaSlice<u32>,
    /// `row_starts[r]..row_starts[r+1]` index `docs` for touched row `r`.
    row_starts: CudaSlice<u32>,
    /// The document of each occurrence, grouped by row, in document order within a row.
    docs: CudaSlice<u32>,
    /// 1/len per document (1 for an empty one), as the CPU computes it.
    inv_len: CudaSlice<f32>,
    /// Each document's length, for the SGD step −lr/len.
    lens: Vec<u32>,
    /// One past the largest id and the largest label (checked against the table and the
    /// classes before a kernel could read past them).
    id_end: u64,
    label_end: i64,
}

/// Adam's per-step constants as the kernels take them (`struct Adam` in elementwise.cu).
#[repr(C)]
#[derive(Clone, Copy)]
struct AdamK {
    b1: f32,
    b2: f32,
    ob1: f32,
    ob2: f32,
    inv_c1: f32,
    inv_sqrt_c2: f32,
    eps: f32,
    wd: f32,
}

// SAFETY: a plain `repr(C)` struct of eight f32, laid out as the kernels' `struct Adam`.
unsafe impl DeviceRepr for AdamK {}

// SAFETY: `RowMap` is `repr(C)`: three u32, a u32, three u64 (40 bytes, 8-aligned), laid
// out as the kernels' `struct Rows` in common.cuh.
unsafe impl DeviceRepr for RowMap {}

impl AdamK {
    fn new(h: &AdamStep) -> Self {
        let (c1, c2) = (1.0 - h.beta1.powi(h.t as i32), 1.0 - h.beta2.powi(h.t as i32));
        AdamK {
            b1: h.beta1 as f32,
            b2: h.beta2 as f32,
            ob1: (1.0 - h.beta1) as f32,
            ob2: (1.0 - h.beta2) as f32,
            inv_c1: (1.0 / c1) as f32,
            inv_sqrt_c2: (1.0 / c2.sqrt()) as f32,
            eps: h.eps as f32,
            wd: h.weight_decay as f32,
        }
    }
}

/// Threads for a block that sweeps rows of `width`: a power of two from 32 to 256, and
/// 1024 for rows past 8192 values (few, long rows: a block per row must still fill the
/// device).
fn row_threads(width: usize) -> u32 {
    if width > 8192 {
        1024
    } else {
        width.next_power_of_two().clamp(32, 256) as u32
    }
}

/// One block per row.
fn per_row(rows: usize, width: usize) -> LaunchConfig {
    LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (row_threads(width), 1, 1), shared_mem_bytes: 0 }
}

/// A grid-stride launch over `n` elements.
fn grid(n: usize) -> LaunchConfig {
    let blocks = n.div_ceil(THREADS as usize).clamp(1, MAX_BLOCKS as usize) as u32;
    LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 }
}

impl Cuda {
    /// Opens device `ordinal`: the driver, a stream, cuBLAS, and every kernel compiled by
    /// NVRTC for the device's compute capability. Each missing piece is an
    /// [`Error::Device`] naming it.
    pub fn new(ordinal: usize) -> Result<Cuda> {
        let count = device::device_count().map_err(Error::Device)?;
        if ordinal >= count {
            return Err(Error::Device(format!(
                "CUDA device {ordinal} was asked for, but the driver lists {count} device(s)"
            )));
        }
        let ctx = CudaContext::new(ordinal).map_err(|e| Error::Device(format!("cuda:{ordinal}: {e}")))?;
        let (major, minor) =
            ctx.compute_capability().map_err(|e| Error::Device(format!("cuda:{ordinal}: {e}")))?;
        // Streams are ordered by explicit events: the backend runs on one stream, and the
        // only other one, `dist`'s NCCL stream, waits for an event before it touches the
        // gradient and is waited for before the compute stream touches it again. cudarc's
        // per-buffer event tracking would instead order every use of the whole gradient
        // buffer after NCCL's last write, which serialises the overlap of communication
        // with the backward pass.
        // SAFETY: called before any buffer exists; `dist::nccl` keeps the rules above (no
        // buffer freed or written by the compute stream while NCCL works on it).
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.default_stream();
        // SAFETY: `is_culib_present` only tries to load the library.
        if !unsafe { cudarc::cublas::sys::is_culib_present() } {
            return Err(Error::Device(
                "libcublas (cuBLAS) was not found: put its lib folder on LD_LIBRARY_PATH".into(),
            ));
        }
        let blas = CudaBlas::new(stream.clone()).map_err(|e| Error::Device(format!("cuBLAS: {e}")))?;
        let arch = format!("{major}{minor}");
        let mut funcs = HashMap::new();
        for &(name, source, entries) in device::SOURCES {
            let ptx = device::compile_cached(name, source, &arch)?;
            let module = ctx.load_module(ptx).map_err(|e| {
                let hint = if format!("{e:?}").contains("UNSUPPORTED_PTX_VERSION") {
                    format!(
                        " (NVRTC {:?} writes PTX newer than the driver's CUDA {:?} reads: put an NVRTC no \
                         newer than the driver first on LD_LIBRARY_PATH)",
                        device::nvrtc_version(),
                        device::driver_version().ok()
                    )
                } else {
                    String::new()
                };
                Error::Device(format!("cuda:{ordinal}: loading kernels/{name}: {e}{hint}"))
            })?;
            for &entry in entries {
                let f = module
                    .load_function(entry)
                    .map_err(|e| Error::Device(format!("kernels/{name}: entry point {entry}: {e}")))?;
                funcs.insert(entry, f);
            }
        }
        let dummy =
            stream.alloc_zeros::<f32>(1).map_err(|e| Error::Device(format!("cuda:{ordinal}: {e}")))?;
        Ok(Cuda { ordinal, stream, blas, funcs, dummy, matmul: Matmul::F32 })
    }

    /// This backend with the linear layers' GEMMs at `matmul` precision (TF32 or bf16
    /// tensor cores, f32 accumulation and outputs; see [`Matmul`]).
    pub fn with_matmul(self, matmul: Matmul) -> Self {
        Cuda { matmul, ..self }
    }

    /// `cuda:N (device name)`.
    pub fn describe(&self) -> String {
        let name = self.stream.context().name().unwrap_or_else(|e| format!("name unavailable: {e}"));
        format!("cuda:{} ({name})", self.ordinal)
    }

    /// The compute stream (every operation of this backend runs on it); `dist`'s NCCL
    /// communicator forks its own stream from it.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// The device ordinal.
    pub fn ordinal(&self) -> usize {
        self.ordinal
    }

    /// The device's UUID (what tells two ranks apart that see their GPUs under the same
    /// ordinal, e.g. each with its own `CUDA_VISIBLE_DEVICES`).
    pub fn uuid(&self) -> Result<[u8; 16]> {
        let u = self
            .stream
            .context()
            .uuid()
            .map_err(|e| Error::Device(format!("cuda:{}: uuid: {e}", self.ordinal)))?;
        Ok(u.bytes.map(|b| b as u8))
    }

    /// `dst[i] = bf16(src[i])` for i in `range`, rounded to nearest even
    /// (`half::bf16::from_f32`); `dst` must be as long as `src`.
    pub fn to_bf16(
        &self,
        src: &CudaSlice<f32>,
        dst: &mut CudaSlice<half::bf16>,
        range: std::ops::Range<usize>,
    ) {
        assert!(
            dst.len() == src.len() && range.end <= src.len(),
            "to_bf16: {range:?} of {} into {}",
            src.len(),
            dst.len()
        );
        let n = range.len();
        let (from, mut to) = (src.slice(range.clone()), dst.slice_mut(range));
        self.launch("to_bf16", grid(n), |b| {
            b.arg(&from).arg(&mut to).arg(&n);
        });
    }

    /// `dst[i] = f32(src[i])·scale`, for `n = src.len()` values (`dst` must be as long):
    /// exact when `scale` is 1, else the f32 product rounded to bf16 again.
    pub fn from_bf16(&self, src: &CudaSlice<half::bf16>, dst: &mut CudaSlice<f32>, scale: f32) {
        let n = src.len();
        assert_eq!(dst.len(), n, "from_bf16: {} values into a buffer of {}", n, dst.len());
        self.launch("from_bf16", grid(n), |b| {
            b.arg(src).arg(&mut *dst).arg(&n).arg(&scale);
        });
    }

    fn f(&self, name: &str) -> &CudaFunction {
        self.funcs.get(name).unwrap_or_else(|| panic!("kernel {name} is not loaded"))
    }

    fn fail(&self, what: &str, e: impl std::fmt::Display) -> ! {
        panic!("cuda:{}: {what} failed: {e}", self.ordinal)
    }

    fn htod<T: DeviceRepr>(&self, host: &[T]) -> CudaSlice<T> {
        self.stream.clone_htod(host).unwrap_or_else(|e| self.fail("upload", e))
    }

    fn alloc<T: DeviceRepr + ValidAsZeroBits>(&self, len: usize) -> CudaSlice<T> {
        self.stream.alloc_zeros::<T>(len).unwrap_or_else(|e| self.fail("allocation", e))
    }

    /// Makes `buf` exactly `len` long (a new zeroed buffer when it is not).
    fn ensure_len(&self, buf: &mut CudaSlice<f32>, len: usize) {
        if buf.len() != len {
            *buf = self.alloc(len);
        }
    }

    /// Runs a launch built by `args` with `cfg`, unless the launch covers nothing.
    fn launch<'a>(
        &'a self,
        name: &str,
        cfg: LaunchConfig,
        args: impl FnOnce(&mut cudarc::driver::LaunchArgs<'a>),
    ) {
        if cfg.grid_dim.0 == 0 {
            return;
        }
        let mut b = self.stream.launch_builder(self.f(name));
        args(&mut b);
        // SAFETY: each call site passes the arguments in the order and types of the kernel's
        // signature in kernels/*.cu, with buffers at least as long as the indices the kernel
        // reaches for the sizes passed alongside them.
        if let Err(e) = unsafe { b.launch(cfg) } {
            self.fail(name, e);
        }
    }

    /// An optional kernel input and its `has_…` flag (`dummy` and 0 when absent).
    fn optional<'a>(&'a self, b: Option<&'a CudaSlice<f32>>) -> (&'a CudaSlice<f32>, i32) {
        (b.unwrap_or(&self.dummy), i32::from(b.is_some()))
    }

    /// Sums per-block partials (downloaded) in block order.
    fn sum_partials(&self, partial: &CudaSlice<f64>, stride: usize, field: usize) -> f64 {
        let host = self.stream.clone_dtoh(partial).unwrap_or_else(|e| self.fail("download", e));
        host.iter().skip(field).step_by(stride).sum()
    }

    /// `y (n×out) = x (n×in) · Wᵀ`, `beta` times what y holds: cuBLAS is column-major, so the
    /// row-major y is yᵀ = W·xᵀ there, with W read transposed.
    #[allow(clippy::too_many_arguments)]
    fn gemm(
        &self,
        (transa, transb): (bool, bool),
        (m, n, k): (usize, usize, usize),
        a: &cudarc::driver::CudaView<'_, f32>,
        lda: usize,
        b: &cudarc::driver::CudaView<'_, f32>,
        ldb: usize,
        beta: f32,
        c: &mut cudarc::driver::CudaViewMut<'_, f32>,
        ldc: usize,
    ) {
        if m == 0 || n == 0 {
            return;
        }
        let op = |t: bool| if t { cublasOperation_t::CUBLAS_OP_T } else { cublasOperation_t::CUBLAS_OP_N };
        let cfg = GemmConfig {
            transa: op(transa),
            transb: op(transb),
            m: m as i32,
            n: n as i32,
            k: k as i32,
            alpha: 1.0f32,
            lda: lda as i32,
            ldb: ldb as i32,
            beta,
            ldc: ldc as i32,
        };
        let done = match self.matmul {
            // SAFETY: the shapes and leading dimensions describe matrices inside the views, as
            // the row-major layouts of the callers imply.
            Matmul::F32 => unsafe { self.blas.gemm(cfg, a, b, c) },
            Matmul::Tf32 => {
                use cudarc::cublas::sys::cudaDataType_t::CUDA_R_32F;
                // SAFETY: as above.
                unsafe { self.gemm_ex(&cfg, (a, CUDA_R_32F), (b, CUDA_R_32F), c, true) }
            }
            Matmul::Bf16 => {
                use cudarc::cublas::sys::cudaDataType_t::CUDA_R_16BF;
                let (a16, b16) = (self.bf16_copy(a), self.bf16_copy(b));
                // SAFETY: as above; the bf16 copies have the views' lengths and layouts.
                unsafe { self.gemm_ex(&cfg, (&a16, CUDA_R_16BF), (&b16, CUDA_R_16BF), c, false) }
            }
        };
        if let Err(e) = done {
            self.fail(if self.matmul.is_f32() { "cublasSgemm" } else { "cublasGemmEx" }, e);
        }
    }

    /// `view` rounded to bf16 (nearest even) in a fresh buffer of its length.
    fn bf16_copy(&self, view: &cudarc::driver::CudaView<'_, f32>) -> CudaSlice<half::bf16> {
        let n = view.len();
        let mut out = self.alloc::<half::bf16>(n);
        self.launch("to_bf16", grid(n), |b| {
            b.arg(view).arg(&mut out).arg(&n);
        });
        out
    }

    /// `cublasGemmEx` with f32 α, β and output `c`, operands of the given types, and f32
    /// accumulation (TF32 tensor cores when `tf32`).
    ///
    /// # Safety
    /// `cfg`'s shapes and leading dimensions must describe matrices inside `a`, `b` and `c`.
    unsafe fn gemm_ex<TA, TB, A, B>(
        &self,
        cfg: &GemmConfig<f32>,
        (a, a_type): (&A, cudarc::cublas::sys::cudaDataType_t),
        (b, b_type): (&B, cudarc::cublas::sys::cudaDataType_t),
        c: &mut cudarc::driver::CudaViewMut<'_, f32>,
        tf32: bool,
    ) -> std::result::Result<(), cudarc::cublas::result::CublasError>
    where
        A: cudarc::driver::DevicePtr<TA>,
        B: cudarc::driver::DevicePtr<TB>,
    {
        use cudarc::cublas::sys::{cublasComputeType_t, cublasGemmAlgo_t, cudaDataType_t};
        use cudarc::driver::DevicePtrMut;
        let (pa, _ra) = a.device_ptr(&self.stream);
        let (pb, _rb) = b.device_ptr(&self.stream);
        let (pc, _rc) = c.device_ptr_mut(&self.stream);
        let compute = if tf32 {
            cublasComputeType_t::CUBLAS_COMPUTE_32F_FAST_TF32
        } else {
            cublasComputeType_t::CUBLAS_COMPUTE_32F
        };
        cudarc::cublas::result::gemm_ex(
            *self.blas.handle(),
            cfg.transa,
            cfg.transb,
            cfg.m,
            cfg.n,
            cfg.k,
            (&cfg.alpha) as *const f32 as *const _,
            pa as *const _,
            a_type,
            cfg.lda,
            pb as *const _,
            b_type,
            cfg.ldb,
            (&cfg.beta) as *const f32 as *const _,
            pc as *mut _,
            cudaDataType_t::CUDA_R_32F,
            cfg.ldc,
            compute,
            cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
        )
    }
}

impl Backend for Cuda {
    type F = f32;
    type Buf = CudaSlice<f32>;
    type Batch = CudaBatch;

    fn name(&self) -> String {
        format!("cuda:{}", self.ordinal)
    }

    fn buf_len(&self, buf: &CudaSlice<f32>) -> usize {
        buf.len()
    }

    fn zeros(&self, len: usize) -> CudaSlice<f32> {
        self.alloc(len)
    }

    fn upload(&self, host: &[f32]) -> CudaSlice<f32> {
        self.htod(host)
    }

    fn download(&self, buf: &CudaSlice<f32>) -> Vec<f32> {
        if buf.is_empty() {
            return Vec::new();
        }
        self.stream.clone_dtoh(buf).unwrap_or_else(|e| self.fail("download", e))
    }

    fn synchronize(&self) {
        self.stream.synchronize().unwrap_or_else(|e| panic!("cuda:{}: synchronize: {e}", self.ordinal));
    }

    fn as_cuda(&self) -> Option<&Cuda> {
        Some(self)
    }

    fn cuda_buf<'a>(&self, buf: &'a mut CudaSlice<f32>) -> Option<&'a mut CudaSlice<f32>> {
        Some(buf)
    }

    fn fill_zero(&self, buf: &mut CudaSlice<f32>) {
        if !buf.is_empty() {
            self.stream.memset_zeros(buf).unwrap_or_else(|e| self.fail("memset", e));
        }
    }

    fn upload_batch(&self, batch: &HostBatch) -> CudaBatch {
        let n = batch.len();
        let lens: Vec<u32> = (0..n).map(|i| batch.offsets[i + 1] - batch.offsets[i]).collect();
        // Occurrences sorted by (id, document), as the CPU's backward pass sorts them.
        let mut occ: Vec<(u32, u32)> = Vec::with_capacity(batch.ids.len());
        for i in 0..n {
            for &id in &batch.ids[batch.offsets[i] as usize..batch.offsets[i + 1] as usize] {
                occ.push((id, i as u32));
            }
        }
        occ.sort_unstable();
        let mut rows = Vec::new();
        let mut starts = Vec::new();
        for (k, o) in occ.iter().enumerate() {
            if k == 0 || occ[k - 1].0 != o.0 {
                rows.push(o.0);
                starts.push(k as u32);
            }
        }
        starts.push(occ.len() as u32);
        let docs: Vec<u32> = occ.iter().map(|o| o.1).collect();
        let inv_len: Vec<f32> = lens.iter().map(|&l| 1.0 / l.max(1) as f32).collect();
        let offsets = if batch.offsets.is_empty() { vec![0] } else { batch.offsets.clone() };
        let id_end = batch.ids.iter().map(|&i| u64::from(i) + 1).max().unwrap_or(0);
        let label_end = batch.labels.iter().map(|&l| i64::from(l) + 1).max().unwrap_or(0);
        CudaBatch {
            id_end,
            label_end,
            n,
            ids: self.htod(&batch.ids),
            offsets: self.htod(&offsets),
            labels: self.htod(&batch.labels),
            rows_dev: self.htod(&rows),
            rows,
            row_starts: self.htod(&starts),
            docs: self.htod(&docs),
            inv_len: self.htod(&inv_len),
            lens,
        }
    }

    fn embedding_bag_forward(
        &self,
        params: &CudaSlice<f32>,
        table: Slot,
        batch: &CudaBatch,
        out: &mut CudaSlice<f32>,
    ) {
        let dim = table.cols;
        assert!(
            batch.id_end <= table.rows as u64,
            "embedding_bag_forward: an id past the table's {} rows",
            table.rows
        );
        self.ensure_len(out, batch.n * dim);
        let t = params.slice(table.range());
        let (n, d) = (batch.n as i32, dim as i32);
        self.launch("bag_forward", per_row(batch.n, dim), |b| {
            b.arg(&t).arg(&batch.ids).arg(&batch.offsets).arg(&n).arg(&d).arg(out);
        });
    }

    fn embedding_bag_backward(
        &self,
        batch: &CudaBatch,
        dout: &CudaSlice<f32>,
        dim: usize,
        out: &mut SparseRows<CudaSlice<f32>>,
    ) {
        out.dim = dim;
        out.rows.clone_from(&batch.rows);
        self.ensure_len(&mut out.values, batch.rows.len() * dim);
        let (rows, d) = (batch.rows.len() as i32, dim as i32);
        let values = &mut out.values;
        self.launch("bag_backward", per_row(batch.rows.len(), dim), |b| {
            b.arg(dout)
                .arg(&batch.row_starts)
                .arg(&batch.docs)
                .arg(&batch.inv_len)
                .arg(&rows)
                .arg(&d)
                .arg(values);
        });
    }

    fn embedding_bag_sgd(
        &self,
        params: &mut CudaSlice<f32>,
        table: Slot,
        batch: &CudaBatch,
        dout: &CudaSlice<f32>,
        lr: f64,
    ) {
        let dim = table.cols;
        assert!(
            batch.id_end <= table.rows as u64,
            "embedding_bag_sgd: an id past the table's {} rows",
            table.rows
        );
        let step: Vec<f32> = batch.lens.iter().map(|&l| (-lr / f64::from(l.max(1))) as f32).collect();
        let step = self.htod(&step);
        let mut t = params.slice_mut(table.range());
        let (rows, d) = (batch.rows.len() as i32, dim as i32);
        self.launch("bag_sgd", per_row(batch.rows.len(), dim), |b| {
            b.arg(&mut t)
                .arg(&batch.rows_dev)
                .arg(dout)
                .arg(&batch.row_starts)
                .arg(&batch.docs)
                .arg(&step)
                .arg(&rows)
                .arg(&d);
        });
    }

    fn linear_forward(
        &self,
        x: &CudaSlice<f32>,
        n: usize,
        params: &CudaSlice<f32>,
        w: Slot,
        b: Slot,
        y: &mut CudaSlice<f32>,
    ) {
        let (out_dim, in_dim) = (w.rows, w.cols);
        self.ensure_len(y, n * out_dim);
        let bias = params.slice(b.range());
        let (rows, width) = (n, out_dim as u32);
        self.launch("fill_rows", grid(n * out_dim), |a| {
            a.arg(&mut *y).arg(&bias).arg(&rows).arg(&width);
        });
        // yᵀ (out×n) += W (out×in) · xᵀ (in×n); W is Wᵀ column-major with ld = in.
        let wv = params.slice(w.range());
        let xv = x.slice(..n * in_dim);
        let mut yv = y.slice_mut(..);
        self.gemm((true, false), (out_dim, n, in_dim), &wv, in_dim, &xv, in_dim, 1.0, &mut yv, out_dim);
    }

    fn linear_backward(
        &self,
        x: &CudaSlice<f32>,
        n: usize,
        params: &CudaSlice<f32>,
        w: Slot,
        b: Slot,
        dy: &CudaSlice<f32>,
        grads: &mut CudaSlice<f32>,
        dx: Option<&mut CudaSlice<f32>>,
    ) {
        let (out_dim, in_dim) = (w.rows, w.cols);
        let dyv = dy.slice(..n * out_dim);
        if let Some(dx) = dx {
            self.ensure_len(dx, n * in_dim);
            // dxᵀ (in×n) = Wᵀ (in×out) · dyᵀ (out×n).
            let wv = params.slice(w.range());
            let mut dxv = dx.slice_mut(..);
            self.gemm(
                (false, false),
                (in_dim, n, out_dim),
                &wv,
                in_dim,
                &dyv,
                out_dim,
                0.0,
                &mut dxv,
                in_dim,
            );
        }
        {
            // dWᵀ (in×out) += xᵀ (in×n) · dy (n×out).
            let xv = x.slice(..n * in_dim);
            let mut gw = grads.slice_mut(w.range());
            self.gemm((false, true), (in_dim, out_dim, n), &xv, in_dim, &dyv, out_dim, 1.0, &mut gw, in_dim);
        }
        let mut gb = grads.slice_mut(b.range());
        let (rows, width) = (n as u32, out_dim as u32);
        self.launch("col_sums_add", grid(out_dim), |a| {
            a.arg(&mut gb).arg(&dyv).arg(&rows).arg(&width);
        });
    }

    fn activation_forward(&self, act: Activation, x: &CudaSlice<f32>, y: &mut CudaSlice<f32>) {
        self.ensure_len(y, x.len());
        let (code, n) = (act_code(act), x.len());
        self.launch("activation_forward", grid(n), |b| {
            b.arg(&code).arg(x).arg(y).arg(&n);
        });
    }

    fn activation_backward(
        &self,
        act: Activation,
        x: &CudaSlice<f32>,
        dy: &CudaSlice<f32>,
        dx: &mut CudaSlice<f32>,
    ) {
        self.ensure_len(dx, x.len());
        let (code, n) = (act_code(act), x.len());
        self.launch("activation_backward", grid(n), |b| {
            b.arg(&code).arg(x).arg(dy).arg(dx).arg(&n);
        });
    }

    fn dropout(&self, p: f32, key: DropoutKey, width: usize, x: &mut CudaSlice<f32>) {
        if p <= 0.0 {
            return;
        }
        let (n, w) = (x.len(), width.max(1) as u32);
        // As the CPU computes it in f32: 1 / (1 − p).
        let scale = 1.0f32 / (1.0 - f64::from(p)) as f32;
        let base = key.base();
        self.launch("dropout", grid(n), |b| {
            b.arg(x).arg(&n).arg(&w).arg(&p).arg(&scale).arg(&base).arg(&key.rows);
        });
    }

    fn softmax_loss(
        &self,
        logits: &CudaSlice<f32>,
        classes: usize,
        batch: &CudaBatch,
        loss: LossKind,
        scale: f32,
        dlogits: &mut CudaSlice<f32>,
        row_loss: &mut CudaSlice<f32>,
    ) -> f64 {
        let n = batch.n;
        assert!(batch.label_end <= classes as i64, "softmax_loss: a label past the {classes} classes");
        assert!(logits.len() >= n * classes, "softmax_loss: logits rows");
        self.ensure_len(dlogits, n * classes);
        self.ensure_len(row_loss, n);
        let (kind, param) = match loss {
            LossKind::CrossEntropy { smoothing } => (0i32, smoothing as f32),
            LossKind::Focal { gamma } => (1i32, gamma as f32),
        };
        let (ni, c) = (n as i32, classes as i32);
        self.launch("softmax_loss", per_row(n, classes), |b| {
            b.arg(logits)
                .arg(&ni)
                .arg(&c)
                .arg(&batch.labels)
                .arg(&kind)
                .arg(&param)
                .arg(&scale)
                .arg(&mut *dlogits)
                .arg(&mut *row_loss);
        });
        self.download(row_loss).iter().map(|&v| f64::from(v)).sum()
    }

    fn consistency(
        &self,
        op: &ConsistencyOp,
        student: &CudaSlice<f32>,
        s_row0: usize,
        target: &CudaSlice<f32>,
        n: usize,
        classes: usize,
        aux: &ConsistencyAux<'_, CudaSlice<f32>>,
        dstudent: &mut CudaSlice<f32>,
        dtarget: Option<&mut CudaSlice<f32>>,
        rows: &mut CudaSlice<f32>,
    ) -> ConsistencyOut {
        assert!(
            student.len() >= (s_row0 + n) * classes && dstudent.len() >= (s_row0 + n) * classes,
            "consistency: student rows"
        );
        assert!(target.len() >= n * classes, "consistency: target rows");
        assert!(aux.bias.is_none_or(|b| b.len() >= classes), "consistency: bias");
        assert!(aux.class_threshold.is_none_or(|m| m.len() >= classes), "consistency: class thresholds");
        assert!(aux.row_weight.is_none_or(|w| w.len() >= n), "consistency: row weights");
        assert!(dtarget.as_ref().is_none_or(|d| d.len() >= n * classes), "consistency: dtarget rows");
        self.ensure_len(rows, 3 * n);
        let kind: i32 = match op.kind {
            ConsistencyKind::Mse => 0,
            ConsistencyKind::Kl => 1,
            ConsistencyKind::CeHard => 2,
            ConsistencyKind::SymKl => 3,
        };
        let form: i32 = match op.form {
            TargetForm::Logits => 0,
            TargetForm::Probs => 1,
        };
        let (bias, has_bias) = self.optional(aux.bias);
        let (mult, has_mult) = self.optional(aux.class_threshold);
        let (weight, has_weight) = self.optional(aux.row_weight);
        let has_dt = i32::from(dtarget.is_some());
        // The kernel reads `dtarget` only when `has_dt` is set; otherwise it gets `dummy`,
        // which a shared borrow cannot hand out as mutable: use a scratch buffer.
        let mut scratch;
        let dt: &mut CudaSlice<f32> = match dtarget {
            Some(d) => d,
            None => {
                scratch = self.alloc::<f32>(1);
                &mut scratch
            }
        };
        let mut passed = self.alloc::<i32>(n.max(1));
        let (s0, ni, c) = (s_row0 as i32, n as i32, classes as i32);
        let (inv_t, tau, scale) = ((1.0 / op.temperature) as f32, op.threshold as f32, op.scale as f32);
        self.launch("consistency", per_row(n, classes), |b| {
            b.arg(student)
                .arg(&s0)
                .arg(target)
                .arg(&ni)
                .arg(&c)
                .arg(bias)
                .arg(&has_bias)
                .arg(mult)
                .arg(&has_mult)
                .arg(weight)
                .arg(&has_weight)
                .arg(&kind)
                .arg(&form)
                .arg(&inv_t)
                .arg(&tau)
                .arg(&scale)
                .arg(&mut *dstudent)
                .arg(&mut *dt)
                .arg(&has_dt)
                .arg(&mut *rows)
                .arg(&mut passed);
        });
        let host = self.download(rows);
        let flags = self.stream.clone_dtoh(&passed).unwrap_or_else(|e| self.fail("download", e));
        ConsistencyOut {
            loss_sum: host[..n].iter().map(|&v| f64::from(v)).sum(),
            passed: flags.iter().filter(|&&f| f != 0).count(),
        }
    }

    fn ema(
        &self,
        shadow: &mut CudaSlice<f32>,
        params: &CudaSlice<f32>,
        range: std::ops::Range<usize>,
        alpha: f64,
    ) {
        let n = range.len();
        let (a, b) = (alpha as f32, (1.0 - alpha) as f32);
        let mut s = shadow.slice_mut(range.clone());
        let p = params.slice(range);
        self.launch("ema", grid(n.div_ceil(4)), |l| {
            l.arg(&mut s).arg(&p).arg(&n).arg(&a).arg(&b);
        });
    }

    fn ema_rows(
        &self,
        shadow: &mut CudaSlice<f32>,
        params: &CudaSlice<f32>,
        table: Slot,
        rows: &[u32],
        factors: &[f64],
    ) {
        if rows.is_empty() {
            return;
        }
        let dim = table.cols as u32;
        let a: Vec<f32> = factors.iter().map(|&f| f as f32).collect();
        let b: Vec<f32> = factors.iter().map(|&f| (1.0 - f) as f32).collect();
        let (rows_d, a, b) = (self.htod(rows), self.htod(&a), self.htod(&b));
        let k = rows.len();
        let mut s = shadow.slice_mut(table.range());
        let p = params.slice(table.range());
        self.launch("ema_rows", grid(k * dim as usize), |l| {
            l.arg(&mut s).arg(&p).arg(&rows_d).arg(&a).arg(&b).arg(&k).arg(&dim);
        });
    }

    fn copy(&self, dst: &mut CudaSlice<f32>, src: &CudaSlice<f32>, range: std::ops::Range<usize>) {
        if range.is_empty() {
            return;
        }
        let s = src.slice(range.clone());
        let mut d = dst.slice_mut(range);
        self.stream.memcpy_dtod(&s, &mut d).unwrap_or_else(|e| self.fail("copy", e));
    }

    fn softmax(&self, logits: &CudaSlice<f32>, classes: usize, probs: &mut CudaSlice<f32>) {
        self.ensure_len(probs, logits.len());
        let n = logits.len() / classes.max(1);
        let (ni, c) = (n as i32, classes as i32);
        self.launch("softmax_rows", per_row(n, classes), |b| {
            b.arg(logits).arg(&ni).arg(&c).arg(probs);
        });
    }

    fn sq_norm(&self, buf: &CudaSlice<f32>, range: std::ops::Range<usize>) -> f64 {
        let n = range.len();
        if n == 0 {
            return 0.0;
        }
        let cfg = grid(n);
        let mut partial = self.alloc::<f64>(cfg.grid_dim.0 as usize);
        let x = buf.slice(range);
        self.launch("sq_norm_partial", cfg, |b| {
            b.arg(&x).arg(&n).arg(&mut partial);
        });
        self.sum_partials(&partial, 1, 0)
    }

    fn scale(&self, buf: &mut CudaSlice<f32>, range: std::ops::Range<usize>, factor: f64) {
        let n = range.len();
        let f = factor as f32;
        let mut x = buf.slice_mut(range);
        self.launch("scale_buf", grid(n), |b| {
            b.arg(&mut x).arg(&n).arg(&f);
        });
    }

    fn axpy(&self, y: &mut CudaSlice<f32>, x: &CudaSlice<f32>, alpha: f64) {
        assert_eq!(y.len(), x.len(), "axpy: lengths differ");
        let (n, a) = (x.len(), alpha as f32);
        self.launch("axpy", grid(n), |b| {
            b.arg(y).arg(x).arg(&n).arg(&a);
        });
    }

    fn adamw(
        &self,
        params: &mut CudaSlice<f32>,
        grads: &CudaSlice<f32>,
        m: &mut CudaSlice<f32>,
        v: &mut CudaSlice<f32>,
        slot: Slot,
        h: AdamStep,
    ) {
        let r = slot.range();
        let n = r.len();
        let (k, lr) = (AdamK::new(&h), h.lr as f32);
        let (mut p, g, mut m, mut v) =
            (params.slice_mut(r.clone()), grads.slice(r.clone()), m.slice_mut(r.clone()), v.slice_mut(r));
        self.launch("adamw", grid(n), |b| {
            b.arg(&mut p).arg(&g).arg(&mut m).arg(&mut v).arg(&n).arg(&k).arg(&lr);
        });
    }

    fn lamb(
        &self,
        params: &mut CudaSlice<f32>,
        grads: &CudaSlice<f32>,
        m: &mut CudaSlice<f32>,
        v: &mut CudaSlice<f32>,
        slot: Slot,
        h: AdamStep,
    ) {
        let r = slot.range();
        let n = r.len();
        if n == 0 {
            return;
        }
        let k = AdamK::new(&h);
        let cfg = grid(n);
        let mut partial = self.alloc::<f64>(2 * cfg.grid_dim.0 as usize);
        let mut u = self.alloc::<f32>(n);
        let (mut p, g, mut m, mut v) =
            (params.slice_mut(r.clone()), grads.slice(r.clone()), m.slice_mut(r.clone()), v.slice_mut(r));
        self.launch("lamb_direction", cfg, |b| {
            b.arg(&mut p).arg(&g).arg(&mut m).arg(&mut v).arg(&mut u).arg(&n).arg(&k).arg(&mut partial);
        });
        let pn = self.sum_partials(&partial, 2, 0).sqrt();
        let un = self.sum_partials(&partial, 2, 1).sqrt();
        let ratio = if pn > 0.0 && un > 0.0 { pn / un } else { 1.0 };
        let step = (h.lr * ratio) as f32;
        self.launch("lamb_apply", grid(n), |b| {
            b.arg(&mut p).arg(&u).arg(&n).arg(&step);
        });
    }

    fn sgd(
        &self,
        params: &mut CudaSlice<f32>,
        grads: &CudaSlice<f32>,
        buf: &mut CudaSlice<f32>,
        slot: Slot,
        h: SgdStep,
    ) {
        let r = slot.range();
        let n = r.len();
        let (lr, mu, wd) = (h.lr as f32, h.momentum as f32, h.weight_decay as f32);
        let (momentum, nesterov) = (i32::from(h.momentum != 0.0), i32::from(h.nesterov));
        let (mut p, g) = (params.slice_mut(r.clone()), grads.slice(r.clone()));
        // The momentum buffer is read only with momentum; without it `buf` may be empty.
        let mut b_view = if h.momentum != 0.0 { buf.slice_mut(r) } else { buf.slice_mut(..) };
        self.launch("sgd", grid(n), |b| {
            b.arg(&mut p)
                .arg(&g)
                .arg(&mut b_view)
                .arg(&n)
                .arg(&lr)
                .arg(&mu)
                .arg(&wd)
                .arg(&momentum)
                .arg(&nesterov);
        });
    }

    fn sparse_adam(
        &self,
        params: &mut CudaSlice<f32>,
        table: Slot,
        grad: &SparseRows<CudaSlice<f32>>,
        m: &mut CudaSlice<f32>,
        v: &mut CudaSlice<f32>,
        h: AdamStep,
    ) {
        if grad.rows.is_empty() {
            return;
        }
        let k = AdamK::new(&AdamStep { weight_decay: 0.0, ..h });
        let lr = h.lr as f32;
        let rows = self.htod(&grad.rows);
        let (count, dim) = (grad.rows.len(), grad.dim as u32);
        let r = table.range();
        let (mut p, mut m, mut v) = (params.slice_mut(r.clone()), m.slice_mut(r.clone()), v.slice_mut(r));
        self.launch("sparse_adam", grid(count * grad.dim), |b| {
            b.arg(&mut p)
                .arg(&mut m)
                .arg(&mut v)
                .arg(&rows)
                .arg(&grad.values)
                .arg(&count)
                .arg(&dim)
                .arg(&k)
                .arg(&lr);
        });
    }

    fn sparse_sgd(
        &self,
        params: &mut CudaSlice<f32>,
        table: Slot,
        grad: &SparseRows<CudaSlice<f32>>,
        lr: f64,
    ) {
        if grad.rows.is_empty() {
            return;
        }
        let lr = lr as f32;
        let rows = self.htod(&grad.rows);
        let (count, dim) = (grad.rows.len(), grad.dim as u32);
        let mut p = params.slice_mut(table.range());
        self.launch("sparse_sgd", grid(count * grad.dim), |b| {
            b.arg(&mut p).arg(&rows).arg(&grad.values).arg(&count).arg(&dim).arg(&lr);
        });
    }

    fn sparse_add(
        &self,
        a: SparseRows<CudaSlice<f32>>,
        b: &SparseRows<CudaSlice<f32>>,
    ) -> SparseRows<CudaSlice<f32>> {
        let dim = a.dim;
        // Merge the sorted row lists on the host; the kernel adds the rows' values.
        let (mut i, mut j) = (0, 0);
        let (mut rows, mut ia, mut ib) = (Vec::new(), Vec::new(), Vec::new());
        while i < a.rows.len() || j < b.rows.len() {
            let take_a = j == b.rows.len() || (i < a.rows.len() && a.rows[i] <= b.rows[j]);
            let take_b = i == a.rows.len() || (j < b.rows.len() && b.rows[j] <= a.rows[i]);
            rows.push(if take_a { a.rows[i] } else { b.rows[j] });
            ia.push(if take_a { i as i32 } else { -1 });
            ib.push(if take_b { j as i32 } else { -1 });
            i += usize::from(take_a);
            j += usize::from(take_b);
        }
        let k = rows.len();
        let mut values = self.alloc::<f32>(k * dim);
        if k > 0 {
            let (ia, ib) = (self.htod(&ia), self.htod(&ib));
            let d = dim as u32;
            self.launch("sparse_merge", grid(k * dim), |l| {
                l.arg(&a.values).arg(&ia).arg(&b.values).arg(&ib).arg(&mut values).arg(&k).arg(&d);
            });
        }
        SparseRows { rows, values, dim }
    }
}

impl super::EncoderOps for Cuda {
    fn layer_norm_forward(
        &self,
        x: &CudaSlice<f32>,
        n: usize,
        params: &CudaSlice<f32>,
        gamma: Slot,
        beta: Slot,
        eps: f64,
        y: &mut CudaSlice<f32>,
        stats: &mut CudaSlice<f32>,
    ) {
        let w = gamma.len();
        assert!(
            x.len() >= n * w && beta.len() == w,
            "layer_norm_forward: x rows, or γ and β of different widths"
        );
        self.ensure_len(y, n * w);
        self.ensure_len(stats, 2 * n);
        let (g, b) = (params.slice(gamma.range()), params.slice(beta.range()));
        let (ni, wi, e) = (n as i32, w as i32, eps as f32);
        self.launch("layer_norm_forward", per_row(n, w), |l| {
            l.arg(x).arg(&ni).arg(&wi).arg(&g).arg(&b).arg(&e).arg(&mut *y).arg(&mut *stats);
        });
    }

    fn layer_norm_backward(
        &self,
        x: &CudaSlice<f32>,
        n: usize,
        params: &CudaSlice<f32>,
        gamma: Slot,
        beta: Slot,
        stats: &CudaSlice<f32>,
        dy: &CudaSlice<f32>,
        grads: &mut CudaSlice<f32>,
        dx: &mut CudaSlice<f32>,
    ) {
        let w = gamma.len();
        assert!(x.len() >= n * w && dy.len() >= n * w && stats.len() >= 2 * n, "layer_norm_backward: rows");
        assert_eq!(beta.len(), w, "layer_norm_backward: γ and β of different widths");
        self.ensure_len(dx, n * w);
        let g = params.slice(gamma.range());
        let (ni, wi) = (n as i32, w as i32);
        self.launch("layer_norm_backward_dx", per_row(n, w), |l| {
            l.arg(x).arg(&ni).arg(&wi).arg(&g).arg(stats).arg(dy).arg(&mut *dx);
        });
        // dγ and dβ: two disjoint views of the gradient buffer.
        let (first, second) = if gamma.offset < beta.offset { (gamma, beta) } else { (beta, gamma) };
        let (lo, mut hi) = grads.split_at_mut(second.offset);
        let mut lo = lo;
        let mut a = lo.slice_mut(first.range());
        let mut b = hi.slice_mut(0..second.len());
        let (dg, db) = if gamma.offset < beta.offset { (&mut a, &mut b) } else { (&mut b, &mut a) };
        self.launch("layer_norm_backward_params", grid(w), |l| {
            l.arg(x).arg(&ni).arg(&wi).arg(stats).arg(dy).arg(dg).arg(db);
        });
    }

    fn attention_forward(
        &self,
        q: &CudaSlice<f32>,
        k: &CudaSlice<f32>,
        v: &CudaSlice<f32>,
        mask: &CudaSlice<f32>,
        (b, l, heads): (usize, usize, usize),
        scale: f64,
        dropout: Option<AttnDropout>,
        ctx: &mut CudaSlice<f32>,
        probs: &mut CudaSlice<f32>,
    ) {
        let (hd, d) = attention_dims(q, k, v, (b, l, heads));
        assert!(mask.len() >= b * l, "attention_forward: mask");
        self.ensure_len(ctx, b * l * hd);
        self.ensure_len(probs, b * heads * l * l);
        if b * l * heads == 0 {
            return;
        }
        let cfg = attention_grid((b, l, heads), l);
        let (li, hi, di, sc) = (l as i32, heads as i32, d as i32, scale as f32);
        let (dp, db, dr) = attention_dropout_args(dropout);
        self.launch("attention_forward", cfg, |a| {
            a.arg(q)
                .arg(k)
                .arg(v)
                .arg(mask)
                .arg(&li)
                .arg(&hi)
                .arg(&di)
                .arg(&sc)
                .arg(&dp)
                .arg(&db)
                .arg(&dr)
                .arg(&mut *ctx)
                .arg(&mut *probs);
        });
    }

    fn attention_backward(
        &self,
        q: &CudaSlice<f32>,
        k: &CudaSlice<f32>,
        v: &CudaSlice<f32>,
        probs: &CudaSlice<f32>,
        dctx: &CudaSlice<f32>,
        (b, l, heads): (usize, usize, usize),
        scale: f64,
        dropout: Option<AttnDropout>,
        dq: &mut CudaSlice<f32>,
        dk: &mut CudaSlice<f32>,
        dv: &mut CudaSlice<f32>,
    ) {
        let (hd, d) = attention_dims(q, k, v, (b, l, heads));
        assert!(
            probs.len() >= b * heads * l * l && dctx.len() >= b * l * hd,
            "attention_backward: probs or dctx rows"
        );
        for buf in [&mut *dq, &mut *dk, &mut *dv] {
            self.ensure_len(buf, b * l * hd);
        }
        if b * l * heads == 0 {
            return;
        }
        let mut ds = self.alloc::<f32>(b * heads * l * l);
        let (li, hi, di, sc) = (l as i32, heads as i32, d as i32, scale as f32);
        let (dp, db, dr) = attention_dropout_args(dropout);
        self.launch("attention_backward_rows", attention_grid((b, l, heads), l), |a| {
            a.arg(k)
                .arg(v)
                .arg(probs)
                .arg(dctx)
                .arg(&li)
                .arg(&hi)
                .arg(&di)
                .arg(&sc)
                .arg(&dp)
                .arg(&db)
                .arg(&dr)
                .arg(&mut ds)
                .arg(&mut *dq);
        });
        self.launch("attention_backward_keys", attention_grid((b, l, heads), d), |a| {
            a.arg(q)
                .arg(probs)
                .arg(dctx)
                .arg(&ds)
                .arg(&li)
                .arg(&hi)
                .arg(&di)
                .arg(&dp)
                .arg(&db)
                .arg(&dr)
                .arg(&mut *dk)
                .arg(&mut *dv);
        });
    }
}

/// The kernels' dropout arguments: the rate (0 = none), the hash base and the sequences'
/// global positions.
fn attention_dropout_args(dropout: Option<AttnDropout>) -> (f32, u64, RowMap) {
    dropout.map_or((0.0, 0, RowMap::at(0)), |d| (d.p, d.base, d.rows))
}

/// The row width H·d and head width d of attention's q, k and v (b·l rows each), checked.
fn attention_dims(
    q: &CudaSlice<f32>,
    k: &CudaSlice<f32>,
    v: &CudaSlice<f32>,
    (b, l, heads): (usize, usize, usize),
) -> (usize, usize) {
    let hd = q.len() / (b * l).max(1);
    let d = hd / heads.max(1);
    assert!(
        hd == heads * d && q.len() == b * l * hd && k.len() == q.len() && v.len() == q.len(),
        "attention: q, k and v must be {b}·{l} rows of {heads} heads"
    );
    (hd, d)
}

/// One block per (row of a sequence, head, sequence), `width` the values each block sweeps.
fn attention_grid((b, l, heads): (usize, usize, usize), width: usize) -> LaunchConfig {
    assert!(b <= 65535 && heads <= 65535, "attention: {b} sequences or {heads} heads exceed a grid's 65535");
    LaunchConfig {
        grid_dim: (l as u32, heads as u32, b as u32),
        block_dim: (row_threads(width), 1, 1),
        shared_mem_bytes: 0,
    }
}

fn act_code(act: Activation) -> i32 {
    match act {
        Activation::Relu => 0,
        Activation::Gelu => 1,
        Activation::Tanh => 2,
        Activation::GeluErf => 3,
    }
}
