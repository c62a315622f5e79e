//! Tensors between the ranks of a stage-parallel job, addressed by `(step, tag)` and received
//! in the background, so that no rank ever blocks in a send while its peer blocks in one too.
//!
//! Every rank owns one channel (a duplicate of the group) that only it sends on; on every other
//! rank a receiver thread listens on that channel and files what arrives into a mailbox. A
//! message is a fixed-size header (`step`, `tag`, dtype, shape) followed by its elements as f32;
//! both travel under MPI tag 0 on the sender's channel, and MPI's non-overtaking rule keeps a
//! header and its elements together. The main thread takes a message by `(source, step, tag)`
//! whenever it needs it, in any order.
//!
//! Why threads and not ordered receives: with blocking sends (MPI's rendezvous protocol for
//! large messages) two ranks that each send before they receive wait for each other forever. A
//! receiver that always listens makes every send complete as soon as it reaches the wire.
//!
//! Back-pressure: a receiver holds a message of step `u` (and with it, under MPI, the sender's
//! blocking send of its elements) until this rank has started step `u - ahead`. A rank that
//! needs nothing from above (GIM's bottom rank) therefore runs at most `ahead` steps before the
//! rank that reads it, instead of filling the reader's memory with every step's activations.
//! This cannot deadlock: a rank only ever waits for a message of a step it has started, which is
//! never held, and a sender only blocks on a message of a later step than any it still owes.

use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};

use super::{Communicator, DistError, Result};

/// The elements of a header: kind, step, tag, dtype, rank, then up to [`MAX_DIMS`] dimensions.
const HEADER: usize = 5 + MAX_DIMS;
const MAX_DIMS: usize = 8;
const KIND_MESSAGE: u64 = 1;
const KIND_CLOSE: u64 = 2;
/// The longest a receiver sleeps between polls for the next message.
const MAX_NAP: Duration = Duration::from_millis(1);

/// What one rank sent and received, and how long its main thread waited for messages.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct PostStats {
    pub sent_bytes: u64,
    pub received_bytes: u64,
    pub messages_sent: u64,
    pub messages_received: u64,
    /// Seconds the main thread spent in [`Postbox::take`] waiting for a message not yet there,
    /// and in [`Postbox::send`] (copying, or held back by a receiver that is `ahead` steps
    /// behind: under MPI a large message's send returns only once the receiver takes it).
    pub waiting_s: f64,
}

#[derive(Default)]
struct Boxes {
    /// Arrived and not yet taken, by (source, step, tag); several messages under one address
    /// are taken in the order they came.
    mail: HashMap<(usize, u64, u32), Vec<Tensor>>,
    /// The step this rank's main thread has started ([`Postbox::advance`]).
    step: u64,
    /// Sources whose channel ended (closed or failed).
    ended: Vec<bool>,
    failure: Option<String>,
    received_bytes: u64,
    messages_received: u64,
}

struct Shared {
    boxes: Mutex<Boxes>,
    changed: Condvar,
    ahead: u64,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Boxes> {
        // A receiver that panicked left valid maps behind.
        self.boxes.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// One rank's end of the stage traffic: its sending channel, and a receiver per other rank.
pub struct Postbox {
    rank: usize,
    size: usize,
    channel: Arc<dyn Communicator>,
    shared: Arc<Shared>,
    receivers: Vec<JoinHandle<()>>,
    device: Device,
    sent: (u64, u64),
    waiting: Duration,
}

impl std::fmt::Debug for Postbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Postbox {{ rank: {}, size: {} }}", self.rank, self.size)
    }
}

fn dtype_code(d: DType) -> Result<u64> {
    Ok(match d {
        DType::F32 => 0,
        DType::F16 => 1,
        DType::BF16 => 2,
        // Elements travel as f32: exact for these three, not for f64.
        other => return Err(DistError::Unsupported { op: "post", dtype: other.as_str() }),
    })
}

fn dtype_of(code: u64) -> Result<DType> {
    Ok(match code {
        0 => DType::F32,
        1 => DType::F16,
        2 => DType::BF16,
        c => return Err(DistError::Mismatch(format!("a message of unknown dtype code {c}"))),
    })
}

fn candle(op: &'static str, e: candle_core::Error) -> DistError {
    DistError::Shape { op, detail: e.to_string() }
}

impl Postbox {
    /// Opens the postbox of every rank of `group` (collective: every rank calls it, in the same
    /// order as its other collectives). Messages are handed out on `device`; a receiver holds a
    /// message more than `ahead` steps beyond this rank's current step.
    pub fn open(group: &Arc<dyn Communicator>, device: &Device, ahead: u64) -> Result<Self> {
        let (rank, size) = (group.rank(), group.size());
        let mut channels = Vec::with_capacity(size);
        for _ in 0..size {
            channels.push(group.duplicate()?);
        }
        let shared = Arc::new(Shared {
            boxes: Mutex::new(Boxes { ended: vec![false; size], ..Boxes::default() }),
            changed: Condvar::new(),
            ahead,
        });
        let mut receivers = vec![];
        for (source, ch) in channels.iter().enumerate() {
            if source == rank {
                continue;
            }
            let (ch, shared) = (ch.clone(), shared.clone());
            let handle = std::thread::Builder::new()
                .name(format!("postbox-{rank}-from-{source}"))
                .spawn(move || receive_from(source, ch.as_ref(), &shared))
                .map_err(|e| DistError::Init(format!("cannot start a receiver thread: {e}")))?;
            receivers.push(handle);
        }
        Ok(Postbox {
            rank,
            size,
            channel: channels[rank].clone(),
            shared,
            receivers,
            device: device.clone(),
            sent: (0, 0),
            waiting: Duration::ZERO,
        })
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    /// Sends `t` to `dest` as message `(step, tag)`; returns once it may be dropped.
    pub fn send(&mut self, dest: usize, step: u64, tag: u32, t: &Tensor) -> Result<()> {
        if dest == self.rank || dest >= self.size {
            return Err(DistError::NoSuchRank { op: "post", rank: dest, size: self.size });
        }
        let dims = t.dims();
        if dims.len() > MAX_DIMS {
            return Err(DistError::Shape {
                op: "post",
                detail: format!("{} dimensions (at most {MAX_DIMS})", dims.len()),
            });
        }
        let mut header = [0u64; HEADER];
        header[0] = KIND_MESSAGE;
        header[1] = step;
        header[2] = u64::from(tag);
        header[3] = dtype_code(t.dtype())?;
        header[4] = dims.len() as u64;
        for (h, &d) in header[5..].iter_mut().zip(dims) {
            *h = d as u64;
        }
        let data: Vec<f32> =
            t.to_dtype(DType::F32).and_then(|x| x.flatten_all()?.to_vec1()).map_err(|e| candle("post", e))?;
        let start = Instant::now();
        self.channel.send(&header, dest, 0)?;
        self.channel.send(&data, dest, 0)?;
        self.waiting += start.elapsed();
        self.sent.0 += (data.len() * 4) as u64;
        self.sent.1 += 1;
        Ok(())
    }

    /// Message `(step, tag)` from `source`, waiting for it if it has not arrived.
    pub fn take(&mut self, source: usize, step: u64, tag: u32) -> Result<Tensor> {
        let start = Instant::now();
        let mut b = self.shared.lock();
        loop {
            if let Some(q) = b.mail.get_mut(&(source, step, tag)) {
                let t = q.remove(0);
                if q.is_empty() {
                    b.mail.remove(&(source, step, tag));
                }
                drop(b);
                self.waiting += start.elapsed();
                return t.to_device(&self.device).map_err(|e| candle("take", e));
            }
            if let Some(f) = &b.failure {
                return Err(DistError::Traffic(f.clone()));
            }
            if b.ended[source] {
                return Err(DistError::PeerFailed { op: "take", rank: self.rank });
            }
            b = self.shared.changed.wait(b).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// This rank starts `step`: messages up to `step + ahead` are let in.
    pub fn advance(&self, step: u64) {
        let mut b = self.shared.lock();
        b.step = b.step.max(step);
        self.shared.changed.notify_all();
    }

    /// What went through so far.
    pub fn stats(&self) -> PostStats {
        let b = self.shared.lock();
        PostStats {
            sent_bytes: self.sent.0,
            messages_sent: self.sent.1,
            received_bytes: b.received_bytes,
            messages_received: b.messages_received,
            waiting_s: self.waiting.as_secs_f64(),
        }
    }

    /// Ends the traffic (collective): tells every other rank that nothing more comes from here,
    /// then waits until every other rank has said the same. Messages never taken are dropped.
    pub fn close(mut self) -> Result<PostStats> {
        let mut header = [0u64; HEADER];
        header[0] = KIND_CLOSE;
        for dest in (0..self.size).filter(|&d| d != self.rank) {
            self.channel.send(&header, dest, 0)?;
        }
        // Nothing is held back any more: a receiver must reach the close behind the messages.
        self.advance(u64::MAX);
        for h in self.receivers.drain(..) {
            let _ = h.join();
        }
        let stats = self.stats();
        match self.shared.lock().failure.take() {
            Some(f) => Err(DistError::Traffic(f)),
            None => Ok(stats),
        }
    }
}

/// The receiver thread for messages from `source`: files each into the mailbox until `source`
/// closes its channel.
fn receive_from(source: usize, ch: &(dyn Communicator + 'static), shared: &Shared) {
    let outcome = (|| -> Result<()> {
        loop {
            // Poll, sleeping between polls, rather than block in MPI's receive, which spins at
            // 100 % of a core: with a core per rank that core is the computation's. A message
            // waits at most the longest sleep, short beside a stage's compute.
            let mut nap = Duration::from_micros(20);
            while !ch.probe(source, 0)? {
                std::thread::sleep(nap);
                nap = (nap * 2).min(MAX_NAP);
            }
            let mut header = [0u64; HEADER];
            ch.recv(&mut header, source, 0)?;
            if header[0] == KIND_CLOSE {
                return Ok(());
            }
            let (step, tag, dtype, ndim) = (header[1], header[2] as u32, dtype_of(header[3])?, header[4] as usize);
            if ndim > MAX_DIMS {
                return Err(DistError::Mismatch(format!("a message header with {ndim} dimensions")));
            }
            let dims: Vec<usize> = header[5..5 + ndim].iter().map(|&d| d as usize).collect();
            {
                let mut b = shared.lock();
                while step > b.step.saturating_add(shared.ahead) {
                    b = shared.changed.wait(b).unwrap_or_else(|e| e.into_inner());
                }
            }
            let mut data = vec![0f32; dims.iter().product()];
            ch.recv(&mut data, source, 0)?;
            let bytes = (data.len() * 4) as u64;
            let t = Tensor::from_vec(data, dims, &Device::Cpu)
                .and_then(|t| t.to_dtype(dtype))
                .map_err(|e| candle("receive", e))?;
            let mut b = shared.lock();
            b.mail.entry((source, step, tag)).or_default().push(t);
            b.received_bytes += bytes;
            b.messages_received += 1;
            shared.changed.notify_all();
        }
    })();
    let mut b = shared.lock();
    b.ended[source] = true;
    if let Err(e) = outcome {
        b.failure = Some(format!("from rank {source}: {e}"));
    }
    shared.changed.notify_all();
}
