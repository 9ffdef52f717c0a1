//! MPI for `dist` (the `mpi` feature): initialisation, non-blocking collectives polled
//! against a deadline, and the arrival messages by which rank 0 names the ranks that never
//! reached a collective.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use mpi::datatype::PartitionMut;
use mpi::environment::{Threading, Universe};
use mpi::request::{Request, Scope};
use mpi::topology::SimpleCommunicator;
use mpi::traits::*;
use mpi::Count;

use super::Elem;
use crate::error::{Error, Result};

/// Tag of the arrival messages (a collective's sequence number, sent to rank 0) and of the
/// heartbeats a rank sends rank 0 while it waits in a collective.
const ARRIVE: i32 = 0x7d7;
/// A waiting rank's heartbeat period; rank 0 suspects a rank silent for 4 of them.
const BEAT: Duration = Duration::from_millis(500);

/// What rank 0 has heard from each rank: the latest collective it reached, and when it
/// last sent anything.
struct Heard {
    seq: Vec<u64>,
    at: Vec<Instant>,
}

/// MPI_COMM_WORLD and the watchdog's bookkeeping.
pub(super) struct Comm {
    world: SimpleCommunicator,
    rank: usize,
    size: usize,
    local_rank: usize,
    /// The processes of the job on this node (they share its memory).
    local_size: usize,
    timeout: Duration,
    /// Collectives started by this rank.
    seq: AtomicU64,
    /// Every MPI call holds this lock: calls never overlap, which is all that
    /// MPI_THREAD_SERIALIZED asks. On rank 0 it also guards what each rank reported.
    lock: Mutex<Heard>,
    /// Finalises MPI when the process ends normally (declared last: dropped last).
    _universe: Universe,
}

// SAFETY: the communicator is a handle that MPI lets any thread use under
// MPI_THREAD_SERIALIZED (checked in `init`) as long as calls do not overlap; every method
// takes `lock` around its MPI calls.
unsafe impl Send for Comm {}
// SAFETY: as for Send: all access goes through `lock`.
unsafe impl Sync for Comm {}

impl Comm {
    pub(super) fn init(timeout: Duration) -> Result<Comm> {
        let (universe, provided) = mpi::initialize_with_threading(Threading::Serialized)
            .ok_or_else(|| Error::Data("MPI was initialised twice".into()))?;
        if !matches!(provided, Threading::Serialized | Threading::Multiple) {
            return Err(Error::Data(format!(
                "this MPI library provides thread level {provided:?}; dtrain needs at least Serialized \
                 (its training thread is not the main thread)"
            )));
        }
        let world = universe.world();
        let (rank, size) = (world.rank() as usize, world.size() as usize);
        let node = world.split_shared(rank as i32);
        let (local_rank, local_size) = (node.rank() as usize, node.size() as usize);
        Ok(Comm {
            world,
            rank,
            size,
            local_rank,
            local_size,
            timeout,
            seq: AtomicU64::new(0),
            lock: Mutex::new(Heard { seq: vec![0; size], at: vec![Instant::now(); size] }),
            _universe: universe,
        })
    }

    pub(super) fn rank(&self) -> usize {
        self.rank
    }

    pub(super) fn size(&self) -> usize {
        self.size
    }

    pub(super) fn local_rank(&self) -> usize {
        self.local_rank
    }

    pub(super) fn local_size(&self) -> usize {
        self.local_size
    }

    /// Starts collective number `seq`: other ranks tell rank 0 they reached it; rank 0
    /// reads what has arrived.
    fn arrive(&self, seen: &mut Heard) -> u64 {
        let seq = self.seq.fetch_add(1, Ordering::Relaxed) + 1;
        if self.rank == 0 {
            seen.seq[0] = seq;
            self.drain(seen);
        } else {
            // 8 bytes: sent eagerly, so this returns even if rank 0 is stuck.
            self.world.process_at_rank(0).send_with_tag(&seq, ARRIVE);
        }
        seq
    }

    /// Rank 0: receives every arrival message and heartbeat that is waiting.
    fn drain(&self, seen: &mut Heard) {
        while let Some(status) = self.world.any_process().immediate_probe_with_tag(ARRIVE) {
            let src = status.source_rank();
            let (seq, _) = self.world.process_at_rank(src).receive_with_tag::<u64>(ARRIVE);
            let r = src as usize;
            seen.seq[r] = seen.seq[r].max(seq);
            seen.at[r] = Instant::now();
        }
    }

    /// Polls `req` until it completes; past the deadline, reports and ends the job.
    fn wait<'a, R: ?Sized, S: Scope<'a>>(
        &self,
        what: &str,
        seq: u64,
        start: Instant,
        seen: &mut Heard,
        mut req: Request<'a, R, S>,
    ) {
        let mut polls = 0u32;
        let mut last_beat = Instant::now();
        let mut pause = Duration::from_micros(20);
        loop {
            match req.test() {
                Ok(_) => return,
                Err(r) => req = r,
            }
            if start.elapsed() > self.timeout {
                self.timed_out(what, seq, seen);
            }
            if last_beat.elapsed() > BEAT {
                // Waiting ranks tell rank 0 they are alive; rank 0 reads what came.
                if self.rank == 0 {
                    self.drain(seen);
                } else {
                    self.world.process_at_rank(0).send_with_tag(&seq, ARRIVE);
                }
                last_beat = Instant::now();
            }
            // Poll hot (yielding the core) for a short while, then sleep with a back-off to
            // at most 1 ms, so that ranks sharing cores leave them to the others.
            polls += 1;
            if polls < 2000 {
                std::thread::yield_now();
            } else {
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_millis(1));
            }
        }
    }

    fn timed_out(&self, what: &str, seq: u64, seen: &mut Heard) -> ! {
        let secs = self.timeout.as_secs_f64();
        if self.rank == 0 {
            self.drain(seen);
            let list = |v: Vec<usize>| v.iter().map(|r| r.to_string()).collect::<Vec<_>>().join(", rank ");
            let missing: Vec<usize> = (1..self.size).filter(|&r| seen.seq[r] < seq).collect();
            // Ranks that reached it but stopped sending heartbeats: hung inside it, or dead.
            let silent: Vec<usize> =
                (1..self.size).filter(|&r| seen.seq[r] >= seq && seen.at[r].elapsed() > 4 * BEAT).collect();
            let mut why = Vec::new();
            if !missing.is_empty() {
                why.push(format!("rank {} never reached it (dead or hung)", list(missing)));
            }
            if !silent.is_empty() {
                why.push(format!("rank {} reached it, then fell silent (dead or hung in it)", list(silent)));
            }
            if why.is_empty() {
                why.push("every rank reached it and is alive: the network failed".into());
            }
            eprintln!(
                "dtrain rank 0: {what} (collective {seq}) did not complete within {secs} s: {}; ending the job",
                why.join("; ")
            );
        } else {
            eprintln!(
                "dtrain rank {}: {what} (collective {seq}) did not complete within {secs} s; ending the job \
                 (rank 0 names the ranks that never reached it, unless rank 0 is the one that hangs)",
                self.rank
            );
            // Give rank 0 a moment to name the missing ranks before the job goes.
            std::thread::sleep(Duration::from_secs(2));
        }
        self.world.abort(3)
    }

    /// Sums `buf` over the ranks: one non-blocking all-reduce per bucket, all in flight
    /// at once, started in the order of `buckets` (which tile `buf`).
    pub(super) fn sum<T: Elem>(&self, what: &str, buf: &mut [T], buckets: &[std::ops::Range<usize>]) {
        self.all_reduce(what, buf, buckets, mpi::collective::SystemOperation::sum());
    }

    /// Sums bf16 values (their bits) over the ranks in bf16 arithmetic: each partial sum
    /// is rounded to bf16, as NCCL's bf16 reduction does; half the bytes of an f32 sum.
    pub(super) fn sum_bf16(&self, what: &str, buf: &mut [u16], buckets: &[std::ops::Range<usize>]) {
        // SAFETY: `bf16_sum` reads `len` u16 from `invec` and writes `len` u16 to `inout`,
        // which is what MPI passes it for the u16 buffers this operation reduces.
        let op = unsafe { mpi::collective::UnsafeUserOperation::commutative(bf16_sum) };
        self.all_reduce(what, buf, buckets, &op);
    }

    fn all_reduce<T: Elem, O: mpi::collective::Operation + Copy>(
        &self,
        what: &str,
        buf: &mut [T],
        buckets: &[std::ops::Range<usize>],
        op: O,
    ) {
        let mut seen = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        let start = Instant::now();
        let seq = self.arrive(&mut seen);
        let send = buf.to_vec();
        // Each bucket's part of `buf`, in the order of `buckets`.
        let mut order: Vec<usize> = (0..buckets.len()).collect();
        order.sort_by_key(|&i| buckets[i].start);
        let mut parts: Vec<Option<&mut [T]>> = (0..buckets.len()).map(|_| None).collect();
        let mut rest = &mut buf[..];
        let mut at = 0;
        for &i in &order {
            let (head, tail) = std::mem::take(&mut rest).split_at_mut(buckets[i].end - at);
            parts[i] = Some(&mut head[buckets[i].start - at..]);
            rest = tail;
            at = buckets[i].end;
        }
        mpi::request::scope(|scope| {
            let reqs: Vec<_> = buckets
                .iter()
                .zip(parts)
                .map(|(r, part)| {
                    let part = part.expect("the buckets tile the buffer");
                    self.world.immediate_all_reduce_into(scope, &send[r.clone()], part, op)
                })
                .collect();
            for req in reqs {
                self.wait(what, seq, start, &mut seen, req);
            }
        });
    }

    pub(super) fn all_gather<T: Elem>(&self, what: &str, local: &[T]) -> Vec<Vec<T>> {
        let mut seen = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        let start = Instant::now();
        let seq = self.arrive(&mut seen);
        let mut counts = vec![0u64; self.size];
        let n = [local.len() as u64];
        mpi::request::scope(|scope| {
            let req = self.world.immediate_all_gather_into(scope, &n[..], &mut counts[..]);
            self.wait(what, seq, start, &mut seen, req);
        });
        let total: u64 = counts.iter().sum();
        if total > i32::MAX as u64 {
            eprintln!("dtrain rank {}: {what}: {total} elements exceed MPI's count limit", self.rank);
            self.world.abort(3);
        }
        let c: Vec<Count> = counts.iter().map(|&k| k as Count).collect();
        let displs: Vec<Count> = c
            .iter()
            .scan(0, |acc, &k| {
                let d = *acc;
                *acc += k;
                Some(d)
            })
            .collect();
        let mut out = vec![T::default(); total as usize];
        {
            let mut part = PartitionMut::new(&mut out[..], &c[..], &displs[..]);
            mpi::request::scope(|scope| {
                let req = self.world.immediate_all_gather_varcount_into(scope, local, &mut part);
                self.wait(what, seq, start, &mut seen, req);
            });
        }
        let mut rest = &out[..];
        counts
            .iter()
            .map(|&k| {
                let (head, tail) = rest.split_at(k as usize);
                rest = tail;
                head.to_vec()
            })
            .collect()
    }

    pub(super) fn barrier(&self, what: &str) {
        let mut seen = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        let start = Instant::now();
        let seq = self.arrive(&mut seen);
        let req = self.world.immediate_barrier();
        self.wait(what, seq, start, &mut seen, req);
    }

    pub(super) fn abort(&self, code: i32) -> ! {
        self.world.abort(code)
    }
}

/// MPI's user function for [`Comm::sum_bf16`]: `inout[i] = bf16(f32(invec[i]) + f32(inout[i]))`.
unsafe extern "C" fn bf16_sum(
    invec: *mut std::ffi::c_void,
    inout: *mut std::ffi::c_void,
    len: *mut std::ffi::c_int,
    _: *mut mpi::ffi::MPI_Datatype,
) {
    // SAFETY: MPI passes two buffers of `*len` elements of the reduced type (u16).
    let (a, b) = unsafe {
        let n = usize::try_from(*len).unwrap_or(0);
        (
            std::slice::from_raw_parts(invec as *const u16, n),
            std::slice::from_raw_parts_mut(inout as *mut u16, n),
        )
    };
    for (x, y) in a.iter().zip(b) {
        *y = super::bf16_add(*x, *y);
    }
}
