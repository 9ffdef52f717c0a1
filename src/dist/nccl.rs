//! NCCL for `dist` (the `cuda` feature): the communicator of one rank's GPU, made from the
//! unique id that rank 0 creates and `dist` broadcasts over MPI, on a stream of its own
//! ordered against the compute stream by events, and the dense gradient's average in
//! buckets with `ncclAvg`, in f32 or in bf16 on the wire.
//!
//! **Status: this code has never run on a GPU** (no session with a device has reached it
//! yet). It compiles everywhere; `tests/cuda.rs` holds the checks that a machine with a GPU
//! runs (a one-rank NCCL run equal to the run without communication), skipped without one.
//!
//! This file and `backend/cuda` are the two places that use cudarc: NCCL's calls take the
//! device buffers and streams that the CUDA backend owns (a departure from DESIGN.md's
//! "only backend/cuda touches cudarc", recorded in ARCHITECTURE.md).

use std::ops::Range;
use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream};
use cudarc::nccl::{Comm, Id, ReduceOp};

use crate::backend::cuda::Cuda;

/// Bytes of NCCL's unique id.
pub(super) const ID_BYTES: usize = 128;

/// Whether libnccl loads (cudarc looks for `libnccl.so`; pip's package ships only
/// `libnccl.so.2`: `launch/setup` and `launch/gpu-check` make the link).
pub(super) fn present() -> bool {
    // SAFETY: `is_culib_present` only tries to load the library.
    unsafe { cudarc::nccl::sys::is_culib_present() }
}

/// NCCL's version code (e.g. 22703 for 2.27.3), when the library loads.
pub fn version() -> Option<i32> {
    present().then(cudarc::nccl::result::get_nccl_version).and_then(|r| r.ok())
}

/// A new unique id (rank 0 makes it; every rank joins the communicator with it).
pub(super) fn new_id() -> Result<[u8; ID_BYTES], String> {
    if !present() {
        return Err("libnccl was not found (put the folder of libnccl.so on LD_LIBRARY_PATH)".into());
    }
    let id = Id::new().map_err(|e| format!("ncclGetUniqueId: {e:?}"))?;
    Ok(id.internal().map(|c| c as u8))
}

/// One rank's NCCL communicator and the buffers its bf16 wire format needs.
pub(super) struct Nccl {
    comm: Comm,
    /// The compute stream the gradients are written on.
    compute: Arc<CudaStream>,
    /// The gradient in bf16 when the wire format is bf16, one buffer per gradient length
    /// (MPL averages a student's and a teacher's).
    wire: std::collections::HashMap<usize, CudaSlice<half::bf16>>,
}

// SAFETY: an NCCL communicator may be used from any thread as long as two calls never
// overlap; `dist` keeps it behind a Mutex. CUDA streams and buffers are thread-safe handles.
unsafe impl Send for Nccl {}

impl Nccl {
    /// Joins the communicator of `world` ranks as `rank`, on a stream forked from `be`'s
    /// compute stream. Every rank calls it with the same `id`; it blocks until all have.
    pub(super) fn new(be: &Cuda, rank: usize, world: usize, id: [u8; ID_BYTES]) -> Result<Nccl, String> {
        let compute = be.stream().clone();
        let stream = compute.fork().map_err(|e| format!("{}: a stream for NCCL: {e}", be.describe()))?;
        let comm = Comm::from_rank(stream, rank, world, Id::uninit(id.map(|b| b as std::ffi::c_char)))
            .map_err(|e| format!("ncclCommInitRank (rank {rank} of {world}, {}): {e:?}", be.describe()))?;
        Ok(Nccl { comm, compute, wire: Default::default() })
    }

    /// Replaces `buf` by its average over the ranks: each of `buckets` (in the order given)
    /// is one `ncclAllReduce` with `ncclAvg` on the communicator's stream, which starts once
    /// the compute stream has written the gradient; the compute stream waits for the last
    /// one before it reads `buf` again. With `bf16`, the values travel (and are averaged)
    /// in bf16 and come back rounded.
    pub(super) fn average(
        &mut self,
        be: &Cuda,
        buf: &mut CudaSlice<f32>,
        buckets: &[Range<usize>],
        bf16: bool,
    ) {
        let fail = |what: &str, e: &dyn std::fmt::Debug| -> ! {
            panic!("{}: NCCL gradient average: {what}: {e:?}", be.describe())
        };
        let n = buf.len();
        if n == 0 {
            return;
        }
        let comm_stream = self.comm.stream();
        if bf16 {
            let wire = match self.wire.entry(n) {
                std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                std::collections::hash_map::Entry::Vacant(e) => {
                    e.insert(be.stream().alloc_zeros(n).unwrap_or_else(|e| fail("alloc", &e)))
                }
            };
            be.to_bf16(buf, wire);
        }
        // The gradient (and its bf16 copy) is complete on the compute stream.
        let ready = self.compute.record_event(None).unwrap_or_else(|e| fail("event", &e));
        comm_stream.wait(&ready).unwrap_or_else(|e| fail("stream wait", &e));
        for r in buckets {
            let status = match self.wire.get_mut(&n).filter(|_| bf16) {
                Some(w) => self.comm.all_reduce_in_place(&mut w.slice_mut(r.clone()), &ReduceOp::Avg),
                None => self.comm.all_reduce_in_place(&mut buf.slice_mut(r.clone()), &ReduceOp::Avg),
            };
            status.unwrap_or_else(|e| fail(&format!("ncclAllReduce of elements {r:?}"), &e));
        }
        let done = comm_stream.record_event(None).unwrap_or_else(|e| fail("event", &e));
        self.compute.wait(&done).unwrap_or_else(|e| fail("stream wait", &e));
        if bf16 {
            be.from_bf16(&self.wire[&n], buf);
        }
    }
}
