//! MPI (rsmpi over the system's MPI library, OpenMPI on Debian): one rank per process, started
//! by `mpirun -np N`, `mpirun --hostfile …` or `srun --mpi=pmix`.
//!
//! Errors inside MPI are fatal to the whole job (MPI's default error handler), as is a rank that
//! dies: `mpirun` then ends every rank. What is returned as [`DistError`] are the checks made
//! here before calling MPI (lengths, ranks, types).

use std::sync::{Arc, Mutex, MutexGuard};

use mpi::collective::SystemOperation;
use mpi::datatype::{Equivalence, PartitionMut};
use mpi::environment::Universe;
use mpi::topology::Communicator as _;
use mpi::topology::SimpleCommunicator;
use mpi::traits::*;
use mpi::Threading;

use super::{check_gather, check_rank, Communicator, DistError, Result, Slice, SliceMut};

/// One rank of an MPI communicator.
pub struct Mpi {
    comm: Mutex<SimpleCommunicator>,
    rank: usize,
    size: usize,
    /// MPI is finalised when the last group that holds it is dropped (after its communicator:
    /// fields drop in declaration order).
    _universe: Arc<Universe>,
}

// SAFETY: MPI is initialised with `MPI_THREAD_MULTIPLE` (checked in `Mpi::init`), so MPI calls
// may come from any thread; a group's calls are serialised by the mutex around its communicator,
// and each thread that communicates concurrently uses its own group (`duplicate`), so the calls
// on one communicator never interleave.
unsafe impl Send for Mpi {}
unsafe impl Sync for Mpi {}

impl std::fmt::Debug for Mpi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Mpi {{ rank: {}, size: {} }}", self.rank, self.size)
    }
}

impl Mpi {
    /// Starts MPI (once per process) and returns the world: every rank `mpirun` started.
    pub fn init() -> Result<Arc<dyn Communicator>> {
        let (universe, provided) = mpi::initialize_with_threading(Threading::Multiple)
            .ok_or_else(|| DistError::Init("MPI was already initialised in this process".into()))?;
        if provided < Threading::Multiple {
            return Err(DistError::Init(format!(
                "the MPI library provides {provided:?} threading; the gradient reducer's thread needs MPI_THREAD_MULTIPLE"
            )));
        }
        let world = universe.world();
        let (rank, size) = (world.rank() as usize, world.size() as usize);
        Ok(Arc::new(Mpi { comm: Mutex::new(world), rank, size, _universe: Arc::new(universe) }))
    }

    fn comm(&self, op: &'static str) -> Result<MutexGuard<'_, SimpleCommunicator>> {
        self.comm.lock().map_err(|_| DistError::Poisoned { op })
    }
}

/// MPI counts are C ints.
fn count(op: &'static str, n: usize) -> Result<i32> {
    i32::try_from(n)
        .map_err(|_| DistError::Shape { op, detail: format!("{n} elements is more than MPI's int counts hold") })
}

fn all_reduce<T: Equivalence + Copy>(c: &SimpleCommunicator, buf: &mut [T]) -> Result<()> {
    count("all_reduce_sum", buf.len())?;
    // rsmpi has no MPI_IN_PLACE: reduce from a copy.
    let send = buf.to_vec();
    c.all_reduce_into(&send[..], buf, SystemOperation::sum());
    Ok(())
}

fn all_gather<T: Equivalence>(c: &SimpleCommunicator, send: &[T], counts: &[usize], recv: &mut [T]) -> Result<()> {
    const OP: &str = "all_gather";
    let counts: Vec<i32> = counts.iter().map(|&n| count(OP, n)).collect::<Result<_>>()?;
    let displs: Vec<i32> = counts
        .iter()
        .scan(0i64, |at, &n| {
            let d = *at;
            *at += n as i64;
            Some(d)
        })
        .map(|d| i32::try_from(d).map_err(|_| DistError::Shape { op: OP, detail: "more than 2^31 elements".into() }))
        .collect::<Result<_>>()?;
    let mut part = PartitionMut::new(recv, counts, displs);
    c.all_gather_varcount_into(send, &mut part);
    Ok(())
}

fn recv<T: Equivalence>(c: &SimpleCommunicator, buf: &mut [T], source: usize, tag: u16) -> Result<()> {
    let expected = count("recv", buf.len())?;
    let status = c.process_at_rank(source as i32).receive_into_with_tag(buf, i32::from(tag));
    let got = status.count(T::equivalent_datatype());
    if got != expected {
        return Err(DistError::Shape {
            op: "recv",
            detail: format!("a message of {got} elements into a buffer of {expected}"),
        });
    }
    Ok(())
}

impl Communicator for Mpi {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.size
    }

    fn all_reduce_sum_slice(&self, buf: SliceMut<'_>) -> Result<()> {
        let c = self.comm("all_reduce_sum")?;
        match buf {
            SliceMut::F32(b) => all_reduce(&c, b),
            SliceMut::F64(b) => all_reduce(&c, b),
            SliceMut::U64(b) => all_reduce(&c, b),
            SliceMut::U8(_) => Err(DistError::Unsupported { op: "all_reduce_sum", dtype: "u8" }),
        }
    }

    fn all_gather_slice(&self, send: Slice<'_>, counts: &[usize], recv: SliceMut<'_>) -> Result<()> {
        check_gather(self.rank, self.size, send.len(), counts, recv.len())?;
        let c = self.comm("all_gather")?;
        match (send, recv) {
            (Slice::F32(s), SliceMut::F32(r)) => all_gather(&c, s, counts, r),
            (Slice::F64(s), SliceMut::F64(r)) => all_gather(&c, s, counts, r),
            (Slice::U64(s), SliceMut::U64(r)) => all_gather(&c, s, counts, r),
            (Slice::U8(s), SliceMut::U8(r)) => all_gather(&c, s, counts, r),
            (s, r) => Err(DistError::Shape {
                op: "all_gather",
                detail: format!("{} elements into a {} buffer", s.dtype(), r.dtype()),
            }),
        }
    }

    fn broadcast_slice(&self, buf: SliceMut<'_>, root: usize) -> Result<()> {
        check_rank("broadcast", root, self.size)?;
        count("broadcast", buf.len())?;
        let c = self.comm("broadcast")?;
        let root = c.process_at_rank(root as i32);
        match buf {
            SliceMut::F32(b) => root.broadcast_into(b),
            SliceMut::F64(b) => root.broadcast_into(b),
            SliceMut::U64(b) => root.broadcast_into(b),
            SliceMut::U8(b) => root.broadcast_into(b),
        }
        Ok(())
    }

    fn barrier(&self) -> Result<()> {
        self.comm("barrier")?.barrier();
        Ok(())
    }

    fn send_slice(&self, buf: Slice<'_>, dest: usize, tag: u16) -> Result<()> {
        check_rank("send", dest, self.size)?;
        count("send", buf.len())?;
        let c = self.comm("send")?;
        let to = c.process_at_rank(dest as i32);
        let tag = i32::from(tag);
        match buf {
            Slice::F32(b) => to.send_with_tag(b, tag),
            Slice::F64(b) => to.send_with_tag(b, tag),
            Slice::U64(b) => to.send_with_tag(b, tag),
            Slice::U8(b) => to.send_with_tag(b, tag),
        }
        Ok(())
    }

    fn recv_slice(&self, buf: SliceMut<'_>, source: usize, tag: u16) -> Result<()> {
        check_rank("recv", source, self.size)?;
        let c = self.comm("recv")?;
        match buf {
            SliceMut::F32(b) => recv(&c, b, source, tag),
            SliceMut::F64(b) => recv(&c, b, source, tag),
            SliceMut::U64(b) => recv(&c, b, source, tag),
            SliceMut::U8(b) => recv(&c, b, source, tag),
        }
    }

    fn probe(&self, source: usize, tag: u16) -> Result<bool> {
        check_rank("probe", source, self.size)?;
        let c = self.comm("probe")?;
        Ok(c.process_at_rank(source as i32).immediate_probe_with_tag(i32::from(tag)).is_some())
    }

    fn duplicate(&self) -> Result<Arc<dyn Communicator>> {
        let dup = self.comm("duplicate")?.duplicate();
        Ok(Arc::new(Mpi { comm: Mutex::new(dup), rank: self.rank, size: self.size, _universe: self._universe.clone() }))
    }

    fn abort(&self, code: i32) -> ! {
        // Without the lock: the job must end even if another thread is stuck in a collective.
        SimpleCommunicator::world().abort(code)
    }
}
