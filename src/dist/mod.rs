//! Training across processes: the communicator every distributed piece talks through, and the
//! pieces themselves.
//!
//! Reading order: [`Communicator`] (rank, size, collectives, point-to-point) with three
//! implementations — [`Solo`] (one process: every collective is the identity), [`LocalGroup`]
//! (ranks as threads of one process, for tests) and `Mpi` (behind the `mpi` feature: one rank per
//! process, `mpirun -np N`) — then what is built on it: [`ops`] (collectives as differentiable
//! candle ops: the gathered embeddings of global negatives, the all-reduced sums of synchronised
//! batch norm), [`reducer`] (gradients bucketed and averaged while the backward goes on).
//!
//! # The data-parallel contract
//! `train.batch_size` is the global batch; rank `r` holds a contiguous share of its images
//! ([`crate::data::Shard`]). Each rank's loss is `size × (its anchors' share of the global
//! loss)`, so that the **mean** over ranks of any gradient a rank computes — what
//! [`reducer::GradReducer`] hands back — is the gradient one process computes on the whole batch,
//! also when the shares are uneven. Layers that synchronise (batch norm) are linear in the
//! cotangent a rank feeds them and return that rank's share of each parameter gradient.

pub mod meter;
pub mod ops;
pub mod postbox;
pub mod reducer;
pub mod replicas;

mod local;
#[cfg(feature = "mpi")]
mod mpi;
mod owned;
mod solo;

use std::fmt;
use std::sync::Arc;

pub use local::LocalGroup;
#[cfg(feature = "mpi")]
pub use mpi::Mpi;
pub use solo::Solo;

/// What can go wrong talking to the other ranks.
#[derive(Debug, thiserror::Error)]
pub enum DistError {
    /// A collective was called with buffers whose lengths disagree with what it needs.
    #[error("{op}: {detail}")]
    Shape { op: &'static str, detail: String },
    /// A rank named as root, source or destination does not exist.
    #[error("{op}: rank {rank} does not exist in a group of {size}")]
    NoSuchRank { op: &'static str, rank: usize, size: usize },
    /// The operation is not defined for this element type (a sum of bytes).
    #[error("{op} is not defined for {dtype} elements")]
    Unsupported { op: &'static str, dtype: &'static str },
    /// Another rank of the group stopped (returned an error, panicked or was killed) while this
    /// one waited for it.
    #[error("rank {rank}: {op}: another rank of the group stopped")]
    PeerFailed { op: &'static str, rank: usize },
    /// The MPI library could not be started as training needs it.
    #[error("MPI: {0}")]
    Init(String),
    /// The ranks disagree on something that must be the same everywhere (a bucket layout).
    #[error("ranks disagree: {0}")]
    Mismatch(String),
    /// A thread of this rank panicked while it held the group.
    #[error("{op}: a thread of this rank panicked while communicating")]
    Poisoned { op: &'static str },
    /// A stage-parallel rank's receiver failed (a message that is not one, a peer gone).
    #[error("stage traffic: {0}")]
    Traffic(String),
    /// The gradient reducer's communication thread is gone.
    #[error("gradient reducer: {0}")]
    Reducer(String),
}

pub type Result<T> = std::result::Result<T, DistError>;

/// A slice of one of the element types the collectives move.
#[derive(Debug)]
pub enum Slice<'a> {
    F32(&'a [f32]),
    F64(&'a [f64]),
    U64(&'a [u64]),
    U8(&'a [u8]),
}

/// A mutable [`Slice`].
#[derive(Debug)]
pub enum SliceMut<'a> {
    F32(&'a mut [f32]),
    F64(&'a mut [f64]),
    U64(&'a mut [u64]),
    U8(&'a mut [u8]),
}

impl Slice<'_> {
    pub fn len(&self) -> usize {
        match self {
            Slice::F32(s) => s.len(),
            Slice::F64(s) => s.len(),
            Slice::U64(s) => s.len(),
            Slice::U8(s) => s.len(),
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    pub fn dtype(&self) -> &'static str {
        match self {
            Slice::F32(_) => "f32",
            Slice::F64(_) => "f64",
            Slice::U64(_) => "u64",
            Slice::U8(_) => "u8",
        }
    }
}

impl SliceMut<'_> {
    pub fn len(&self) -> usize {
        match self {
            SliceMut::F32(s) => s.len(),
            SliceMut::F64(s) => s.len(),
            SliceMut::U64(s) => s.len(),
            SliceMut::U8(s) => s.len(),
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    pub fn dtype(&self) -> &'static str {
        match self {
            SliceMut::F32(_) => "f32",
            SliceMut::F64(_) => "f64",
            SliceMut::U64(_) => "u64",
            SliceMut::U8(_) => "u8",
        }
    }
}

/// An element type the collectives move: `f32`, `f64`, `u64`, `u8`.
pub trait Element: Copy + Default + Send + Sync + 'static {
    fn slice(s: &[Self]) -> Slice<'_>;
    fn slice_mut(s: &mut [Self]) -> SliceMut<'_>;
}

macro_rules! element {
    ($t:ty, $v:ident) => {
        impl Element for $t {
            fn slice(s: &[Self]) -> Slice<'_> {
                Slice::$v(s)
            }
            fn slice_mut(s: &mut [Self]) -> SliceMut<'_> {
                SliceMut::$v(s)
            }
        }
    };
}
element!(f32, F32);
element!(f64, F64);
element!(u64, U64);
element!(u8, U8);

/// A group of ranks that run the same program on their own data.
///
/// Collectives must be called by every rank of the group in the same order; a group is used by
/// one thread at a time (a thread that communicates beside the main one, like the gradient
/// reducer's, gets its own group from [`Communicator::duplicate`]). Point-to-point messages are
/// matched by source, destination and tag, in the order they were sent.
///
/// The methods take typed slices ([`Slice`]); the generic forms on `dyn Communicator`
/// ([`all_reduce_sum`](#method.all_reduce_sum), …) are what callers use.
pub trait Communicator: Send + Sync + fmt::Debug {
    /// This process's rank, `0..size`.
    fn rank(&self) -> usize;
    /// Number of ranks.
    fn size(&self) -> usize;
    /// Element-wise sum over the ranks, in place; every rank gets the same bits.
    fn all_reduce_sum_slice(&self, buf: SliceMut<'_>) -> Result<()>;
    /// Every rank's `send`, concatenated in rank order into `recv`; `counts[r]` is rank `r`'s
    /// length (the same `counts` on every rank).
    fn all_gather_slice(&self, send: Slice<'_>, counts: &[usize], recv: SliceMut<'_>) -> Result<()>;
    /// `root`'s `buf` into every rank's `buf` (the same length everywhere).
    fn broadcast_slice(&self, buf: SliceMut<'_>, root: usize) -> Result<()>;
    /// Returns when every rank has called it.
    fn barrier(&self) -> Result<()>;
    /// Sends `buf` to rank `dest`, tagged `tag`; returns once the buffer may be reused.
    fn send_slice(&self, buf: Slice<'_>, dest: usize, tag: u16) -> Result<()>;
    /// Receives the next message from `source` tagged `tag` into `buf` (exactly its length).
    fn recv_slice(&self, buf: SliceMut<'_>, source: usize, tag: u16) -> Result<()>;
    /// Whether a message from `source` tagged `tag` is waiting to be received; never blocks.
    /// (A thread that listens for messages polls with this between sleeps: MPI's blocking
    /// receive busy-waits, taking a whole core from the computation beside it.)
    fn probe(&self, source: usize, tag: u16) -> Result<bool>;
    /// A new group of the same ranks whose messages never mix with this one's (collective).
    fn duplicate(&self) -> Result<Arc<dyn Communicator>>;
    /// Ends the whole job, every rank of it, with `code`: what a rank that cannot go on calls
    /// so that the others do not wait for it forever.
    fn abort(&self, code: i32) -> !;
}

impl dyn Communicator {
    /// Element-wise sum over the ranks, in place.
    pub fn all_reduce_sum<T: Element>(&self, buf: &mut [T]) -> Result<()> {
        self.all_reduce_sum_slice(T::slice_mut(buf))
    }

    /// Every rank's `send` in rank order (the ranks' lengths may differ); with the counts.
    pub fn all_gather<T: Element>(&self, send: &[T]) -> Result<(Vec<T>, Vec<usize>)> {
        let counts = self.all_gather_counts(send.len())?;
        let mut recv = vec![T::default(); counts.iter().sum()];
        self.all_gather_slice(T::slice(send), &counts, T::slice_mut(&mut recv))?;
        Ok((recv, counts))
    }

    /// Every rank's `count`, in rank order.
    pub fn all_gather_counts(&self, count: usize) -> Result<Vec<usize>> {
        let ones = vec![1; self.size()];
        let mut all = vec![0u64; self.size()];
        self.all_gather_slice(Slice::U64(&[count as u64]), &ones, SliceMut::U64(&mut all))?;
        Ok(all.into_iter().map(|c| c as usize).collect())
    }

    /// `root`'s `buf` into every rank's `buf`.
    pub fn broadcast<T: Element>(&self, buf: &mut [T], root: usize) -> Result<()> {
        self.broadcast_slice(T::slice_mut(buf), root)
    }

    /// `root`'s bytes, of any length, to every rank (the others' `bytes` are replaced).
    pub fn broadcast_bytes(&self, bytes: &mut Vec<u8>, root: usize) -> Result<()> {
        let mut len = [bytes.len() as u64];
        self.broadcast(&mut len, root)?;
        bytes.resize(len[0] as usize, 0);
        self.broadcast(bytes.as_mut_slice(), root)
    }

    /// Sends `buf` to `dest` under `tag`.
    pub fn send<T: Element>(&self, buf: &[T], dest: usize, tag: u16) -> Result<()> {
        self.send_slice(T::slice(buf), dest, tag)
    }

    /// Receives exactly `buf.len()` elements from `source` under `tag`.
    pub fn recv<T: Element>(&self, buf: &mut [T], source: usize, tag: u16) -> Result<()> {
        self.recv_slice(T::slice_mut(buf), source, tag)
    }
}

/// Checks shared by the implementations: a rank argument exists.
pub(crate) fn check_rank(op: &'static str, rank: usize, size: usize) -> Result<()> {
    if rank < size {
        Ok(())
    } else {
        Err(DistError::NoSuchRank { op, rank, size })
    }
}

/// Checks shared by the implementations: `counts` has one entry per rank, this rank's entry is
/// `send`'s length and `recv` holds their sum.
pub(crate) fn check_gather(rank: usize, size: usize, send: usize, counts: &[usize], recv: usize) -> Result<()> {
    let op = "all_gather";
    if counts.len() != size {
        return Err(DistError::Shape { op, detail: format!("{} counts for {size} ranks", counts.len()) });
    }
    if counts[rank] != send {
        return Err(DistError::Shape {
            op,
            detail: format!("rank {rank} sends {send} elements but counts say {}", counts[rank]),
        });
    }
    let total: usize = counts.iter().sum();
    if total != recv {
        return Err(DistError::Shape { op, detail: format!("receive buffer of {recv} for {total} elements") });
    }
    Ok(())
}

/// A one-process group (rank 0 of 1).
pub fn solo() -> Arc<dyn Communicator> {
    Arc::new(Solo::default())
}

/// How many ranks the launcher that started this process asked for, if any: `mpirun` (OpenMPI's
/// `OMPI_COMM_WORLD_SIZE`), MPICH/Hydra or Slurm's PMI (`PMI_SIZE`), Slurm's `srun` without an
/// MPI plugin (`SLURM_NTASKS` with `SLURM_PROCID`).
pub fn launched_ranks() -> Option<usize> {
    let var = |k: &str| std::env::var(k).ok().and_then(|v| v.trim().parse::<usize>().ok());
    var("OMPI_COMM_WORLD_SIZE")
        .or_else(|| var("PMI_SIZE"))
        .or_else(|| var("SLURM_PROCID").and_then(|_| var("SLURM_NTASKS")))
}

/// How many ranks of the job the launcher placed on this machine (they share its memory):
/// OpenMPI's `OMPI_COMM_WORLD_LOCAL_SIZE`, Slurm's `SLURM_NTASKS_PER_NODE`.
pub fn launched_local_ranks() -> Option<usize> {
    let var = |k: &str| std::env::var(k).ok().and_then(|v| v.trim().parse::<usize>().ok());
    var("OMPI_COMM_WORLD_LOCAL_SIZE").or_else(|| var("SLURM_NTASKS_PER_NODE"))
}

/// The group this process trains in: MPI's world when a launcher started it in a build with the
/// `mpi` feature, one process otherwise. A binary built without `mpi` but started as one of
/// several ranks is refused: each rank would train alone, N copies of the same run.
pub fn world() -> Result<Arc<dyn Communicator>> {
    let ranks = launched_ranks();
    #[cfg(feature = "mpi")]
    if ranks.is_some() {
        return Mpi::init();
    }
    #[cfg(not(feature = "mpi"))]
    if let Some(n) = ranks.filter(|&n| n > 1) {
        return Err(DistError::Init(format!(
            "started as one of {n} ranks, but this binary was built without the `mpi` feature (cargo build --release --features mpi)"
        )));
    }
    Ok(solo())
}

/// Ends the job from a rank that cannot go on: prints `rank r of n: cause` and aborts every
/// rank. Under MPI a rank must not simply return: MPI's finalisation waits for the other ranks,
/// which wait in their next collective for this one — the job would hang. One process: exits.
pub fn fail(group: &dyn Communicator, cause: &dyn fmt::Display, code: i32) -> ! {
    eprintln!("rank {} of {}: {cause}", group.rank(), group.size());
    if group.size() == 1 {
        std::process::exit(code);
    }
    group.abort(code)
}

/// Makes a panic on this rank end the whole job (after the usual panic message) while `group` is
/// alive: unwinding would finalise MPI, which waits for ranks that wait for this one.
/// Process-wide; nothing to do for one process. The hook holds no reference that would keep
/// the group (and MPI) alive past the caller's last one.
pub fn abort_on_panic(group: &Arc<dyn Communicator>) {
    if group.size() == 1 {
        return;
    }
    let weak = Arc::downgrade(group);
    let report = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        report(info);
        if let Some(g) = weak.upgrade() {
            eprintln!("rank {} of {}: panicked; ending the job", g.rank(), g.size());
            g.abort(101)
        }
    }));
}
