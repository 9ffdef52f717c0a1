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

use cudarc::driver::CudaSlice;
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
    /// The gradient in bf16 when the wire format is bf16, one buffer per gradient length
    /// (MPL averages a student's and a teacher's).
    wire: std::collections::HashMap<usize, CudaSlice<half::bf16>>,
    /// This step's queued part of the gradient so far (by [`Nccl::launch_ready`]): the
    /// gradient's length and the lowest offset queued (everything from there to the end).
    queued: Option<(usize, usize)>,
}

// SAFETY: an NCCL communicator may be used from any thread as long as two calls never
// overlap; `dist` keeps it behind a Mutex. CUDA streams and buffers are thread-safe handles.
unsafe impl Send for Nccl {}

impl Nccl {
    /// Joins the communicator of `world` ranks as `rank`, on a stream forked from `be`'s
    /// compute stream. Every rank calls it with the same `id`; it blocks until all have.
    pub(super) fn new(be: &Cuda, rank: usize, world: usize, id: [u8; ID_BYTES]) -> Result<Nccl, String> {
        // The backend disabled cudarc's per-buffer event tracking (`Cuda::new`): the
        // events below order this stream against the compute stream.
        let stream = be.stream().fork().map_err(|e| format!("{}: a stream for NCCL: {e}", be.describe()))?;
        let comm = Comm::from_rank(stream, rank, world, Id::uninit(id.map(|b| b as std::ffi::c_char)))
            .map_err(|e| format!("ncclCommInitRank (rank {rank} of {world}, {}): {e:?}", be.describe()))?;
        Ok(Nccl { comm, wire: Default::default(), queued: None })
    }

    /// Queues the all-reduce of `buf[from..]` where not queued yet this step: the
    /// backward pass has finished those elements. The new part is cut into buckets of at
    /// most `cap` elements (`dist::bucket_ranges`, last elements first), so that buckets
    /// end where layers end and each layer's gradient leaves as soon as it is done; every
    /// rank makes the same calls in the same order. NCCL's stream waits for the compute
    /// stream to get there first; in bf16, the new part is converted to the wire buffer
    /// on the compute stream before.
    pub(super) fn launch_ready(
        &mut self,
        be: &Cuda,
        buf: &mut CudaSlice<f32>,
        from: usize,
        cap: usize,
        bf16: bool,
    ) {
        let fail = |what: &str, e: &dyn std::fmt::Debug| -> ! {
            panic!("{}: NCCL gradient average: {what}: {e:?}", be.describe())
        };
        let n = buf.len();
        let top = match self.queued {
            Some((len, low)) if len == n => low,
            Some((len, _)) => panic!(
                "{}: NCCL gradient average: this step's average began on a gradient of {len} values and \
                 continued on one of {n}",
                be.describe()
            ),
            None => n,
        };
        if from >= top {
            return;
        }
        let buckets: Vec<Range<usize>> =
            super::bucket_ranges(top - from, cap).into_iter().map(|r| r.start + from..r.end + from).collect();
        if bf16 {
            let wire = match self.wire.entry(n) {
                std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                std::collections::hash_map::Entry::Vacant(e) => {
                    e.insert(be.stream().alloc_zeros(n).unwrap_or_else(|e| fail("alloc", &e)))
                }
            };
            be.to_bf16(buf, wire, from..top);
        }
        // The new part (and its bf16 copy) is complete on the compute stream.
        let comm_stream = self.comm.stream();
        let ready = be.stream().record_event(None).unwrap_or_else(|e| fail("event", &e));
        comm_stream.wait(&ready).unwrap_or_else(|e| fail("stream wait", &e));
        for r in &buckets {
            let status = match self.wire.get_mut(&n).filter(|_| bf16) {
                Some(w) => self.comm.all_reduce_in_place(&mut w.slice_mut(r.clone()), &ReduceOp::Sum),
                None => self.comm.all_reduce_in_place(&mut buf.slice_mut(r.clone()), &ReduceOp::Avg),
            };
            status.unwrap_or_else(|e| fail(&format!("ncclAllReduce of elements {r:?}"), &e));
        }
        self.queued = Some((n, from));
    }

    /// Replaces `buf` by its average over the ranks: queues what [`Nccl::launch_ready`]
    /// has not (each bucket is one `ncclAllReduce` on the communicator's stream), then makes the compute stream wait for them all before it
    /// touches `buf` again. In f32 the reduction is `ncclAvg`. In bf16 the values travel
    /// and are summed in bf16 (`ncclSum`), then scaled by 1/W and rounded to bf16 again on
    /// the way back, as the MPI path does (`ncclAvg` on bf16 would scale each input by a
    /// bf16-rounded 1/W first: a bias of up to 0.4% when W is no power of two).
    ///
    /// With more than one rank the host then waits for the all-reduces, at most `timeout`:
    /// the MPI watchdog cannot see inside NCCL, and a peer that died or hangs would
    /// otherwise block this rank forever. Returns `false` when the time ran out.
    pub(super) fn average(
        &mut self,
        be: &Cuda,
        buf: &mut CudaSlice<f32>,
        cap: usize,
        bf16: bool,
        timeout: std::time::Duration,
    ) -> bool {
        if buf.is_empty() {
            return true;
        }
        self.launch_ready(be, buf, 0, cap, bf16);
        self.queued = None;
        let comm_stream = self.comm.stream();
        let done =
            comm_stream.record_event(None).unwrap_or_else(|e| panic!("{}: NCCL event: {e:?}", be.describe()));
        be.stream().wait(&done).unwrap_or_else(|e| panic!("{}: NCCL stream wait: {e:?}", be.describe()));
        if bf16 {
            be.from_bf16(&self.wire[&buf.len()], buf, (1.0 / self.comm.world_size() as f64) as f32);
        }
        self.comm.world_size() == 1 || wait_bounded(&done, timeout)
    }
}

impl Drop for Nccl {
    /// Waits for the communicator's queued work: dropping a cudarc `Comm` aborts it
    /// (`ncclCommAbort`), which would cancel an all-reduce still in flight.
    fn drop(&mut self) {
        let _ = self.comm.stream().synchronize();
    }
}

/// Polls `event` until it completes (hot yields, then sleeps backing off to 1 ms, as the
/// MPI watchdog polls); `false` after `timeout`.
fn wait_bounded(event: &cudarc::driver::CudaEvent, timeout: std::time::Duration) -> bool {
    let start = std::time::Instant::now();
    let mut pause = std::time::Duration::from_micros(20);
    let mut polls = 0u32;
    while !event.is_complete() {
        if start.elapsed() > timeout {
            return false;
        }
        polls += 1;
        if polls < 2000 {
            std::thread::yield_now();
        } else {
            std::thread::sleep(pause);
            pause = (pause * 2).min(std::time::Duration::from_millis(1));
        }
    }
    true
}
