//! Ranks as threads of one process: the same collectives as MPI's, computed in shared memory,
//! so that every distributed computation can be tested against one process inside `cargo test`.
//! Sums add the ranks' contributions in rank order, so every rank gets the same bits.
//!
//! A rank that stops (returns, panics or calls [`Communicator::abort`]) while the others wait in
//! a collective, or for a message it would have sent, makes them fail with
//! [`DistError::PeerFailed`] instead of waiting forever: the in-process counterpart of `mpirun`
//! ending the job when a rank dies.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use super::owned::Owned;
use super::{check_gather, check_rank, Communicator, DistError, Result, Slice, SliceMut};

/// One rank of an in-process group; made by [`LocalGroup::run`].
#[derive(Debug)]
pub struct LocalGroup {
    rank: usize,
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    size: usize,
    state: Mutex<State>,
    changed: Condvar,
}

#[derive(Debug)]
struct State {
    /// Ranks waiting at the current barrier, and how many barriers have completed.
    arrived: usize,
    generation: u64,
    /// Ranks that stopped: no collective can complete any more.
    stopped: Vec<bool>,
    /// Each rank's contribution to the collective in progress.
    slots: Vec<Option<Owned>>,
    /// The group a `duplicate` in progress hands to every rank.
    dup: Option<Arc<Shared>>,
    /// Messages sent and not yet received, by (source, destination, tag).
    mailboxes: HashMap<(usize, usize, u16), VecDeque<Owned>>,
    /// The groups duplicated from this one: a rank that stops, stops in them too.
    children: Vec<Arc<Shared>>,
}

impl Shared {
    fn new(size: usize) -> Arc<Self> {
        Arc::new(Shared {
            size,
            state: Mutex::new(State {
                arrived: 0,
                generation: 0,
                stopped: vec![false; size],
                slots: vec![None; size],
                dup: None,
                mailboxes: HashMap::new(),
                children: vec![],
            }),
            changed: Condvar::new(),
        })
    }
}

/// Marks `rank` stopped in `shared` and every group duplicated from it, waking their waiters.
fn mark_stopped(shared: &Shared, rank: usize) {
    let children = {
        // A poisoned lock still holds valid state: the flag must be set regardless.
        let mut st = shared.state.lock().unwrap_or_else(|e| e.into_inner());
        st.stopped[rank] = true;
        shared.changed.notify_all();
        st.children.clone()
    };
    for c in &children {
        mark_stopped(c, rank);
    }
}

/// Marks a rank stopped when its thread ends, however it ends.
struct Departure(Arc<Shared>, usize);

impl Drop for Departure {
    fn drop(&mut self) {
        mark_stopped(&self.0, self.1);
    }
}

impl LocalGroup {
    /// Runs `f` on `size` ranks, each on its own thread, and returns their results in rank
    /// order. A panic on any rank is re-raised here once every rank has ended.
    pub fn run<R: Send>(size: usize, f: impl Fn(Arc<dyn Communicator>) -> R + Sync) -> Vec<R> {
        let shared = Shared::new(size.max(1));
        let results: Vec<std::thread::Result<R>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..size.max(1))
                .map(|rank| {
                    let (shared, f) = (shared.clone(), &f);
                    // candle's kernels recurse little, but a test's model can be deep.
                    std::thread::Builder::new().name(format!("rank-{rank}")).stack_size(16 << 20).spawn_scoped(
                        s,
                        move || {
                            let comm = Arc::new(LocalGroup { rank, shared: shared.clone() });
                            let _departure = Departure(shared, rank);
                            f(comm)
                        },
                    )
                })
                .collect();
            handles
                .into_iter()
                .map(|h| match h {
                    Ok(h) => h.join(),
                    Err(e) => {
                        Err(Box::new(format!("cannot start a rank thread: {e}")) as Box<dyn std::any::Any + Send>)
                    }
                })
                .collect()
        });
        results.into_iter().map(|r| r.unwrap_or_else(|e| std::panic::resume_unwind(e))).collect()
    }

    fn lock(&self, op: &'static str) -> Result<MutexGuard<'_, State>> {
        self.shared.state.lock().map_err(|_| DistError::PeerFailed { op, rank: self.rank })
    }

    /// Waits until every rank has arrived; fails if a rank stopped first.
    fn barrier_in(&self, op: &'static str) -> Result<()> {
        let mut st = self.lock(op)?;
        if st.stopped.iter().any(|&s| s) {
            return Err(DistError::PeerFailed { op, rank: self.rank });
        }
        st.arrived += 1;
        if st.arrived == self.shared.size {
            st.arrived = 0;
            st.generation += 1;
            self.shared.changed.notify_all();
            return Ok(());
        }
        let generation = st.generation;
        while st.generation == generation {
            if st.stopped.iter().any(|&s| s) {
                return Err(DistError::PeerFailed { op, rank: self.rank });
            }
            st = self.shared.changed.wait(st).map_err(|_| DistError::PeerFailed { op, rank: self.rank })?;
        }
        Ok(())
    }

    /// Deposits this rank's contribution, waits for all, lets `read` see every slot, waits
    /// until every rank has read (so that the slots may be reused).
    fn exchange(
        &self,
        op: &'static str,
        mine: Option<Owned>,
        read: impl FnOnce(&[Option<Owned>]) -> Result<()>,
    ) -> Result<()> {
        self.lock(op)?.slots[self.rank] = mine;
        self.barrier_in(op)?;
        let outcome = {
            let st = self.lock(op)?;
            read(&st.slots)
        };
        self.barrier_in(op)?;
        outcome
    }
}

fn missing(op: &'static str, rank: usize) -> DistError {
    DistError::Shape { op, detail: format!("rank {rank} contributed nothing") }
}

impl Communicator for LocalGroup {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.shared.size
    }

    fn all_reduce_sum_slice(&self, mut buf: SliceMut<'_>) -> Result<()> {
        const OP: &str = "all_reduce_sum";
        if let SliceMut::U8(_) = buf {
            return Err(DistError::Unsupported { op: OP, dtype: "u8" });
        }
        let mine = Owned::copy_of_mut(&buf);
        self.exchange(OP, Some(mine), |slots| {
            let mut it = slots.iter().enumerate();
            let (_, first) = it.next().ok_or(missing(OP, 0))?;
            first.as_ref().ok_or(missing(OP, 0))?.write_into(&mut buf, 0, OP)?;
            for (r, s) in it {
                s.as_ref().ok_or(missing(OP, r))?.add_into(&mut buf, OP)?;
            }
            Ok(())
        })
    }

    fn all_gather_slice(&self, send: Slice<'_>, counts: &[usize], mut recv: SliceMut<'_>) -> Result<()> {
        const OP: &str = "all_gather";
        check_gather(self.rank, self.size(), send.len(), counts, recv.len())?;
        self.exchange(OP, Some(Owned::copy_of(&send)), |slots| {
            let mut at = 0;
            for (r, s) in slots.iter().enumerate() {
                let s = s.as_ref().ok_or(missing(OP, r))?;
                if s.len() != counts[r] {
                    return Err(DistError::Shape {
                        op: OP,
                        detail: format!("rank {r} sent {} elements, counts say {}", s.len(), counts[r]),
                    });
                }
                s.write_into(&mut sub(&mut recv, at, counts[r]), 0, OP)?;
                at += counts[r];
            }
            Ok(())
        })
    }

    fn broadcast_slice(&self, mut buf: SliceMut<'_>, root: usize) -> Result<()> {
        const OP: &str = "broadcast";
        check_rank(OP, root, self.size())?;
        let mine = (self.rank == root).then(|| Owned::copy_of_mut(&buf));
        let rank = self.rank;
        self.exchange(OP, mine, |slots| {
            if rank == root {
                return Ok(());
            }
            let s = slots[root].as_ref().ok_or(missing(OP, root))?;
            if s.len() != buf.len() {
                return Err(DistError::Shape {
                    op: OP,
                    detail: format!("root sent {}, rank {rank} expects {}", s.len(), buf.len()),
                });
            }
            s.write_into(&mut buf, 0, OP)
        })
    }

    fn barrier(&self) -> Result<()> {
        self.barrier_in("barrier")
    }

    fn send_slice(&self, buf: Slice<'_>, dest: usize, tag: u16) -> Result<()> {
        check_rank("send", dest, self.size())?;
        let mut st = self.lock("send")?;
        st.mailboxes.entry((self.rank, dest, tag)).or_default().push_back(Owned::copy_of(&buf));
        self.shared.changed.notify_all();
        Ok(())
    }

    fn recv_slice(&self, mut buf: SliceMut<'_>, source: usize, tag: u16) -> Result<()> {
        const OP: &str = "recv";
        check_rank(OP, source, self.size())?;
        let mut st = self.lock(OP)?;
        loop {
            if let Some(msg) = st.mailboxes.get_mut(&(source, self.rank, tag)).and_then(VecDeque::pop_front) {
                if msg.len() != buf.len() {
                    return Err(DistError::Shape {
                        op: OP,
                        detail: format!("a message of {} elements into a buffer of {}", msg.len(), buf.len()),
                    });
                }
                return msg.write_into(&mut buf, 0, OP);
            }
            if st.stopped[source] {
                return Err(DistError::PeerFailed { op: OP, rank: self.rank });
            }
            st = self.shared.changed.wait(st).map_err(|_| DistError::PeerFailed { op: OP, rank: self.rank })?;
        }
    }

    fn probe(&self, source: usize, tag: u16) -> Result<bool> {
        const OP: &str = "probe";
        check_rank(OP, source, self.size())?;
        let st = self.lock(OP)?;
        if st.mailboxes.get(&(source, self.rank, tag)).is_some_and(|q| !q.is_empty()) {
            return Ok(true);
        }
        if st.stopped[source] {
            return Err(DistError::PeerFailed { op: OP, rank: self.rank });
        }
        Ok(false)
    }

    fn duplicate(&self) -> Result<Arc<dyn Communicator>> {
        const OP: &str = "duplicate";
        if self.rank == 0 {
            let new = Shared::new(self.shared.size);
            let mut st = self.lock(OP)?;
            st.children.push(new.clone());
            st.dup = Some(new);
        }
        self.barrier_in(OP)?;
        let new = self.lock(OP)?.dup.clone().ok_or(missing(OP, 0))?;
        self.barrier_in(OP)?;
        Ok(Arc::new(LocalGroup { rank: self.rank, shared: new }))
    }

    fn abort(&self, code: i32) -> ! {
        mark_stopped(&self.shared, self.rank);
        panic!("rank {} aborted the group (code {code})", self.rank)
    }
}

/// `buf[at..at + len]`.
fn sub<'a>(buf: &'a mut SliceMut<'_>, at: usize, len: usize) -> SliceMut<'a> {
    match buf {
        SliceMut::F32(s) => SliceMut::F32(&mut s[at..at + len]),
        SliceMut::F64(s) => SliceMut::F64(&mut s[at..at + len]),
        SliceMut::U64(s) => SliceMut::U64(&mut s[at..at + len]),
        SliceMut::U8(s) => SliceMut::U8(&mut s[at..at + len]),
    }
}
