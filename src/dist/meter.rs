//! A group that counts what passes through it: bytes and seconds per kind of operation, for
//! the training summary and the benchmarks. The seconds of a blocking collective include the
//! wait for the slowest rank.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use super::{Communicator, Result, Slice, SliceMut};

/// Bytes this rank contributed and seconds it spent, per kind of operation.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Traffic {
    pub reduce_bytes: u64,
    pub reduce_s: f64,
    pub gather_bytes: u64,
    pub gather_s: f64,
    /// Broadcasts, barriers and point-to-point messages.
    pub other_bytes: u64,
    pub other_s: f64,
    pub calls: u64,
}

impl Traffic {
    pub fn seconds(&self) -> f64 {
        self.reduce_s + self.gather_s + self.other_s
    }
}

/// [`Communicator`] that meters another.
#[derive(Debug)]
pub struct Metered {
    inner: Arc<dyn Communicator>,
    traffic: Mutex<Traffic>,
}

impl Metered {
    pub fn new(inner: Arc<dyn Communicator>) -> Arc<Self> {
        Arc::new(Metered { inner, traffic: Mutex::new(Traffic::default()) })
    }

    /// What went through so far.
    pub fn traffic(&self) -> Traffic {
        self.traffic.lock().map(|t| *t).unwrap_or_default()
    }

    fn count<R>(&self, bytes: usize, kind: fn(&mut Traffic) -> (&mut u64, &mut f64), f: impl FnOnce() -> R) -> R {
        let t = Instant::now();
        let r = f();
        if let Ok(mut tr) = self.traffic.lock() {
            tr.calls += 1;
            let (b, s) = kind(&mut tr);
            *b += bytes as u64;
            *s += t.elapsed().as_secs_f64();
        }
        r
    }
}

fn bytes_mut(s: &SliceMut<'_>) -> usize {
    s.len()
        * match s {
            SliceMut::F32(_) => 4,
            SliceMut::F64(_) | SliceMut::U64(_) => 8,
            SliceMut::U8(_) => 1,
        }
}

fn bytes(s: &Slice<'_>) -> usize {
    s.len()
        * match s {
            Slice::F32(_) => 4,
            Slice::F64(_) | Slice::U64(_) => 8,
            Slice::U8(_) => 1,
        }
}

fn reduce(t: &mut Traffic) -> (&mut u64, &mut f64) {
    (&mut t.reduce_bytes, &mut t.reduce_s)
}
fn gather(t: &mut Traffic) -> (&mut u64, &mut f64) {
    (&mut t.gather_bytes, &mut t.gather_s)
}
fn other(t: &mut Traffic) -> (&mut u64, &mut f64) {
    (&mut t.other_bytes, &mut t.other_s)
}

impl Communicator for Metered {
    fn rank(&self) -> usize {
        self.inner.rank()
    }
    fn size(&self) -> usize {
        self.inner.size()
    }
    fn all_reduce_sum_slice(&self, buf: SliceMut<'_>) -> Result<()> {
        self.count(bytes_mut(&buf), reduce, || self.inner.all_reduce_sum_slice(buf))
    }
    fn all_gather_slice(&self, send: Slice<'_>, counts: &[usize], recv: SliceMut<'_>) -> Result<()> {
        self.count(bytes(&send), gather, || self.inner.all_gather_slice(send, counts, recv))
    }
    fn broadcast_slice(&self, buf: SliceMut<'_>, root: usize) -> Result<()> {
        self.count(bytes_mut(&buf), other, || self.inner.broadcast_slice(buf, root))
    }
    fn barrier(&self) -> Result<()> {
        self.count(0, other, || self.inner.barrier())
    }
    fn send_slice(&self, buf: Slice<'_>, dest: usize, tag: u16) -> Result<()> {
        self.count(bytes(&buf), other, || self.inner.send_slice(buf, dest, tag))
    }
    fn recv_slice(&self, buf: SliceMut<'_>, source: usize, tag: u16) -> Result<()> {
        self.count(bytes_mut(&buf), other, || self.inner.recv_slice(buf, source, tag))
    }
    fn probe(&self, source: usize, tag: u16) -> Result<bool> {
        self.inner.probe(source, tag)
    }
    fn duplicate(&self) -> Result<Arc<dyn Communicator>> {
        self.inner.duplicate()
    }
    fn abort(&self, code: i32) -> ! {
        self.inner.abort(code)
    }
}
