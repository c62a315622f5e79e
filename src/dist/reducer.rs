//! Gradient averaging across ranks while the backward goes on (PyTorch DDP's buckets, fed by
//! the engine as each node's gradients become final).
//!
//! The engine hands over a node's gradients as soon as its last backward has run
//! ([`GradReducer::push`]). They are copied into a flat *bucket*; once a bucket holds
//! `bucket_bytes`, it goes to a communication thread that all-reduces it (on its own duplicate
//! of the group, so that it never mixes with the collectives the main thread runs meanwhile:
//! batch norm's statistics, the losses' gathers) and divides by the number of ranks. The main
//! thread goes on with the backward of the rest. [`GradReducer::ready`] returns, without
//! waiting, each node whose buckets have all come back; [`GradReducer::finish`] sends the last,
//! partly filled bucket and waits for everything.
//!
//! Determinism: every rank pushes the same nodes in the same order (the same schedule), so the
//! buckets are cut at the same places and the averaged gradients come back in push order — the
//! same optimizer steps on every rank. The communication thread checks it: before each
//! all-reduce the ranks compare a digest of the bucket's layout (element type, parameter indices
//! and lengths), and a mismatch is an error, not a silent sum of unrelated values or a hang.

use std::collections::{BTreeMap, VecDeque};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use candle_core::{DType, Device, Shape, Tensor};

use super::{Communicator, DistError, Result};

/// PyTorch DDP's default bucket size.
pub const DEFAULT_BUCKET_BYTES: usize = 25 << 20;

/// One bucket's values: one element type per bucket.
#[derive(Debug)]
enum Values {
    F32(Vec<f32>),
    F64(Vec<f64>),
}

impl Values {
    fn new(dtype: DType) -> Result<Self> {
        match dtype {
            DType::F32 => Ok(Values::F32(vec![])),
            DType::F64 => Ok(Values::F64(vec![])),
            d => Err(DistError::Unsupported { op: "gradient reduction", dtype: dtype_name(d) }),
        }
    }

    fn len(&self) -> usize {
        match self {
            Values::F32(v) => v.len(),
            Values::F64(v) => v.len(),
        }
    }

    fn dtype(&self) -> DType {
        match self {
            Values::F32(_) => DType::F32,
            Values::F64(_) => DType::F64,
        }
    }

    fn bytes(&self) -> usize {
        self.len() * self.dtype().size_in_bytes()
    }
}

fn dtype_name(d: DType) -> &'static str {
    match d {
        DType::F16 => "f16",
        DType::BF16 => "bf16",
        DType::F32 => "f32",
        DType::F64 => "f64",
        _ => "non-float",
    }
}

/// A bucket on its way to or back from the communication thread.
#[derive(Debug)]
struct Bucket {
    seq: u64,
    values: Values,
    /// (parameter index, length) of each gradient, in order: what the ranks compare.
    layout: Vec<(usize, usize)>,
    /// Seconds the communication thread spent on it.
    seconds: f64,
}

/// Where one gradient sits: its bucket and range, and how to rebuild it.
#[derive(Debug)]
struct Slot {
    param: usize,
    shape: Shape,
    device: Device,
    bucket: u64,
    at: usize,
    len: usize,
}

/// A node's averaged gradients, in the order they were pushed.
#[derive(Debug)]
pub struct Reduced {
    /// The caller's key (the engine's node index).
    pub key: usize,
    /// `(parameter index, averaged gradient)`.
    pub grads: Vec<(usize, Tensor)>,
}

/// What the reducer did since it was made (for benchmarks and logs).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ReducerStats {
    pub buckets: u64,
    /// Gradient bytes reduced (this rank's contribution).
    pub bytes: u64,
    /// Seconds the communication thread spent reducing.
    pub communicating_s: f64,
    /// Seconds the main thread waited for reductions in [`GradReducer::finish`].
    pub waiting_s: f64,
}

impl ReducerStats {
    /// Fraction of the communication that the backward hid: 1 when nothing was waited for.
    pub fn hidden(&self) -> f64 {
        if self.communicating_s <= 0.0 {
            return 1.0;
        }
        (1.0 - self.waiting_s / self.communicating_s).clamp(0.0, 1.0)
    }
}

/// Averages gradients over the ranks of a group, bucket by bucket, on a thread of its own.
#[derive(Debug)]
pub struct GradReducer {
    size: usize,
    bucket_bytes: usize,
    open: Option<Bucket>,
    next_seq: u64,
    in_flight: usize,
    to_thread: Option<Sender<Bucket>>,
    from_thread: Receiver<Result<Bucket>>,
    thread: Option<JoinHandle<()>>,
    /// Pushed nodes not yet handed back, oldest first.
    pending: VecDeque<(usize, Vec<Slot>)>,
    /// Buckets back from the thread, by sequence number.
    done: BTreeMap<u64, Values>,
    stats: ReducerStats,
}

impl GradReducer {
    /// A reducer over `group`'s ranks (collective: every rank makes one at the same point, since
    /// it duplicates the group for its thread). Buckets are cut once they hold `bucket_bytes`.
    pub fn new(group: &Arc<dyn Communicator>, bucket_bytes: usize) -> Result<Self> {
        let comm = group.duplicate()?;
        let (to_thread, inbox) = channel::<Bucket>();
        let (outbox, from_thread) = channel::<Result<Bucket>>();
        let thread = std::thread::Builder::new()
            .name("locograph-reduce".into())
            .spawn(move || communicate(comm, inbox, outbox))
            .map_err(|e| DistError::Reducer(format!("cannot start the communication thread: {e}")))?;
        Ok(GradReducer {
            size: group.size(),
            bucket_bytes: bucket_bytes.max(1),
            open: None,
            next_seq: 0,
            in_flight: 0,
            to_thread: Some(to_thread),
            from_thread,
            thread: Some(thread),
            pending: VecDeque::new(),
            done: BTreeMap::new(),
            stats: ReducerStats::default(),
        })
    }

    /// Takes one node's final gradients (`(parameter index, gradient)`, f32 or f64, any device)
    /// under `key`. Starts the all-reduce of every bucket this fills; does not wait for it.
    pub fn push(&mut self, key: usize, grads: Vec<(usize, Tensor)>) -> Result<()> {
        let mut slots = Vec::with_capacity(grads.len());
        for (param, g) in grads {
            let dtype = g.dtype();
            if self.open.as_ref().is_some_and(|b| b.values.dtype() != dtype) {
                self.seal()?;
            }
            if self.open.is_none() {
                let seq = self.next_seq;
                self.next_seq += 1;
                self.open = Some(Bucket { seq, values: Values::new(dtype)?, layout: vec![], seconds: 0.0 });
            }
            let bucket = self.open.as_mut().ok_or_else(|| DistError::Reducer("no open bucket".into()))?;
            let flat = g.flatten_all().and_then(|f| f.to_device(&Device::Cpu)).map_err(candle)?;
            let at = bucket.values.len();
            match &mut bucket.values {
                Values::F32(v) => v.extend(flat.to_vec1::<f32>().map_err(candle)?),
                Values::F64(v) => v.extend(flat.to_vec1::<f64>().map_err(candle)?),
            }
            let len = bucket.values.len() - at;
            bucket.layout.push((param, len));
            slots.push(Slot {
                param,
                shape: g.shape().clone(),
                device: g.device().clone(),
                bucket: bucket.seq,
                at,
                len,
            });
            if bucket.values.bytes() >= self.bucket_bytes {
                self.seal()?;
            }
        }
        self.pending.push_back((key, slots));
        Ok(())
    }

    /// The nodes whose gradients are averaged by now, in push order; never waits.
    pub fn ready(&mut self) -> Result<Vec<Reduced>> {
        while let Ok(b) = self.from_thread.try_recv() {
            self.take_back(b)?;
        }
        self.hand_out()
    }

    /// Sends the last bucket, waits for every reduction, and returns the nodes not yet handed
    /// out, in push order. The reducer is then empty and ready for the next step.
    pub fn finish(&mut self) -> Result<Vec<Reduced>> {
        self.seal()?;
        let t = Instant::now();
        while self.in_flight > 0 {
            let b =
                self.from_thread.recv().map_err(|_| DistError::Reducer("the communication thread stopped".into()))?;
            self.take_back(b)?;
        }
        self.stats.waiting_s += t.elapsed().as_secs_f64();
        let out = self.hand_out()?;
        if !self.pending.is_empty() {
            return Err(DistError::Reducer(format!("{} nodes left unreduced", self.pending.len())));
        }
        Ok(out)
    }

    pub fn stats(&self) -> ReducerStats {
        self.stats
    }

    /// Number of ranks the gradients are averaged over.
    pub fn ranks(&self) -> usize {
        self.size
    }

    fn seal(&mut self) -> Result<()> {
        let Some(b) = self.open.take() else { return Ok(()) };
        self.stats.buckets += 1;
        self.stats.bytes += b.values.bytes() as u64;
        let tx = self.to_thread.as_ref().ok_or_else(|| DistError::Reducer("already shut down".into()))?;
        tx.send(b).map_err(|_| DistError::Reducer("the communication thread stopped".into()))?;
        self.in_flight += 1;
        Ok(())
    }

    fn take_back(&mut self, b: Result<Bucket>) -> Result<()> {
        let b = b?;
        self.in_flight -= 1;
        self.stats.communicating_s += b.seconds;
        self.done.insert(b.seq, b.values);
        Ok(())
    }

    fn hand_out(&mut self) -> Result<Vec<Reduced>> {
        let mut out = vec![];
        while let Some((_, slots)) = self.pending.front() {
            if !slots.iter().all(|s| self.done.contains_key(&s.bucket)) {
                break;
            }
            let (key, slots) = self.pending.pop_front().ok_or_else(|| DistError::Reducer("empty queue".into()))?;
            let mut grads = Vec::with_capacity(slots.len());
            for s in slots {
                let values = self.done.get(&s.bucket).ok_or_else(|| DistError::Reducer("bucket missing".into()))?;
                let t = match values {
                    Values::F32(v) => Tensor::from_slice(&v[s.at..s.at + s.len], s.shape, &s.device),
                    Values::F64(v) => Tensor::from_slice(&v[s.at..s.at + s.len], s.shape, &s.device),
                }
                .map_err(candle)?;
                grads.push((s.param, t));
            }
            out.push(Reduced { key, grads });
            // Buckets no waiting node reads any more are freed.
            let oldest = self.pending.iter().flat_map(|(_, s)| s.iter().map(|s| s.bucket)).min();
            let open = self.open.as_ref().map(|b| b.seq);
            self.done.retain(|&seq, _| oldest.is_some_and(|o| seq >= o) || open.is_some_and(|o| seq >= o));
        }
        Ok(out)
    }
}

impl Drop for GradReducer {
    fn drop(&mut self) {
        // Closing the channel ends the thread once its current all-reduce returns.
        self.to_thread.take();
        if let Some(h) = self.thread.take() {
            let _ = h.join();
        }
    }
}

fn candle(e: candle_core::Error) -> DistError {
    DistError::Reducer(e.to_string())
}

/// FNV-1a over the bucket's layout: equal on every rank iff the buckets line up.
fn digest(values: &Values, layout: &[(usize, usize)]) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    let mut eat = |x: u64| {
        for b in x.to_le_bytes() {
            h ^= b as u64;
            h = h.wrapping_mul(0x100000001b3);
        }
    };
    eat(values.dtype().size_in_bytes() as u64);
    for &(p, n) in layout {
        eat(p as u64);
        eat(n as u64);
    }
    h
}

/// The communication thread: checks each bucket's layout against the other ranks', sums it over
/// the ranks and divides by their number.
fn communicate(comm: Arc<dyn Communicator>, inbox: Receiver<Bucket>, outbox: Sender<Result<Bucket>>) {
    let size = comm.size();
    while let Ok(mut b) = inbox.recv() {
        let t = Instant::now();
        let outcome = (|| -> Result<()> {
            let digests = comm.all_gather_counts(digest(&b.values, &b.layout) as usize)?;
            if digests.iter().any(|&d| d != digests[0]) {
                return Err(DistError::Mismatch(format!(
                    "gradient bucket {} holds different parameters on different ranks (digests {digests:?}): the ranks ran different schedules",
                    b.seq
                )));
            }
            match &mut b.values {
                Values::F32(v) => {
                    comm.all_reduce_sum(v.as_mut_slice())?;
                    let n = size as f32;
                    v.iter_mut().for_each(|x| *x /= n);
                }
                Values::F64(v) => {
                    comm.all_reduce_sum(v.as_mut_slice())?;
                    let n = size as f64;
                    v.iter_mut().for_each(|x| *x /= n);
                }
            }
            Ok(())
        })();
        b.seconds = t.elapsed().as_secs_f64();
        let failed = outcome.is_err();
        if outbox.send(outcome.map(|()| b)).is_err() || failed {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dist::LocalGroup;

    /// Integer-valued gradients (sums exact in f32) on 3 ranks: every rank gets the exact mean,
    /// nodes come back in push order, and small buckets cut nodes across buckets.
    #[test]
    fn averages_exactly_in_push_order() {
        for bucket_bytes in [1, 40, 1 << 20] {
            type Back = Vec<(usize, Vec<(usize, Vec<f32>)>)>;
            let out = LocalGroup::run(3, |g| -> Result<Back> {
                let r = g.rank() as f32;
                let mut red = GradReducer::new(&g, bucket_bytes)?;
                let mut got = vec![];
                for node in 0..4usize {
                    let grads = (0..2)
                        .map(|k| {
                            let p = node * 2 + k;
                            let v: Vec<f32> = (0..5 + p).map(|i| 3.0 * (r + 1.0) * (i + p) as f32).collect();
                            Ok((p, Tensor::from_vec(v, 5 + p, &Device::Cpu).map_err(candle)?))
                        })
                        .collect::<Result<Vec<_>>>()?;
                    red.push(node, grads)?;
                    got.extend(red.ready()?);
                }
                got.extend(red.finish()?);
                assert!(red.stats().buckets >= 1);
                got.into_iter()
                    .map(|r| {
                        Ok((
                            r.key,
                            r.grads
                                .into_iter()
                                .map(|(p, t)| Ok((p, t.to_vec1::<f32>().map_err(candle)?)))
                                .collect::<Result<_>>()?,
                        ))
                    })
                    .collect()
            });
            for res in out {
                let nodes = res.expect("rank ran");
                assert_eq!(nodes.iter().map(|n| n.0).collect::<Vec<_>>(), vec![0, 1, 2, 3], "push order");
                for (node, grads) in nodes {
                    for (k, (p, v)) in grads.into_iter().enumerate() {
                        assert_eq!(p, node * 2 + k);
                        // mean over r of 3(r+1)(i+p) = 6(i+p)
                        let want: Vec<f32> = (0..5 + p).map(|i| 6.0 * (i + p) as f32).collect();
                        assert_eq!(v, want, "bucket {bucket_bytes} param {p}");
                    }
                }
            }
        }
    }

    #[test]
    fn ranks_that_push_different_parameters_get_an_error_not_a_hang() {
        let out = LocalGroup::run(2, |g| -> Result<()> {
            let mut red = GradReducer::new(&g, 1 << 20)?;
            let len = 4 + g.rank();
            red.push(0, vec![(0, Tensor::zeros(len, DType::F32, &Device::Cpu).map_err(candle)?)])?;
            red.finish().map(|_| ())
        });
        for res in out {
            assert!(matches!(res, Err(DistError::Mismatch(_))), "{res:?}");
        }
    }
}
