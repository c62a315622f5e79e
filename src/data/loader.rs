//! The loader pipeline: a producer thread fills a bounded channel (`prefetch` batches deep)
//! with batches whose images are decoded and augmented in parallel on a rayon pool of
//! `workers` threads, so the training step only waits when augmentation is slower than it.
//!
//! Determinism: the shuffle depends on `(seed, epoch)` and each image's random views on
//! `(seed, epoch, dataset index)` only, so a batch is bit-identical for any worker count.

use std::sync::Arc;
use std::thread::JoinHandle;

use crossbeam_channel::{bounded, Receiver};
use rand::seq::SliceRandom;
use rayon::prelude::*;

use super::augment::sample_rng;
use super::shard::Shard;
use super::{DataConfig, DataError, Dataset, Image};

/// A batch ready for the model.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    /// `shape` in row-major order. For a [`PairLoader`]: rows `0..N` are view 1 of images
    /// `indices[0..N]`, rows `N..2N` view 2 of the same images in the same order.
    pub data: Vec<f32>,
    /// `[rows, C, H, W]`: rows = 2N for pairs, N for evaluation.
    pub shape: [usize; 4],
    /// One label per image (N, not 2N); empty when the dataset is unlabeled.
    pub labels: Vec<u32>,
    /// Dataset index of each image.
    pub indices: Vec<usize>,
}

impl Batch {
    /// Number of images (half the rows of a pair batch).
    pub fn len(&self) -> usize {
        self.indices.len()
    }

    /// True when the batch holds no image.
    pub fn is_empty(&self) -> bool {
        self.indices.is_empty()
    }

    /// The images as an `f32` tensor of shape `shape`.
    pub fn to_tensor(&self, device: &candle_core::Device) -> candle_core::Result<candle_core::Tensor> {
        candle_core::Tensor::from_slice(&self.data, &self.shape[..], device)
    }

    /// One label per row as a `u32` tensor: `[2N]` for a pair batch (both views of an image carry
    /// its label), `[N]` otherwise; `None` for unlabeled data.
    pub fn row_labels(&self, device: &candle_core::Device) -> candle_core::Result<Option<candle_core::Tensor>> {
        if self.labels.is_empty() {
            return Ok(None);
        }
        let rows = self.shape[0];
        let per_row: Vec<u32> = self.labels.iter().copied().cycle().take(rows).collect();
        candle_core::Tensor::from_vec(per_row, rows, device).map(Some)
    }

    /// The labels as a `u32` tensor of shape `[N]` (empty for unlabeled data).
    pub fn labels_tensor(&self, device: &candle_core::Device) -> candle_core::Result<candle_core::Tensor> {
        candle_core::Tensor::from_slice(&self.labels, self.labels.len(), device)
    }
}

/// Checks a config against an opened dataset (normalisation length vs output channels).
pub fn check(cfg: &DataConfig, ds: &dyn Dataset) -> Result<(), DataError> {
    let (c, _, _) = cfg.output_shape(ds);
    if let Some(n) = &cfg.augment.normalize {
        if n.mean.len() != c {
            return Err(DataError::Config(vec![format!(
                "augment.normalize has {} values per field but {} has {c} output channel(s){}",
                n.mean.len(),
                ds.name(),
                if c == 1 { " (set augment.to_rgb: true for 3)" } else { "" }
            )]));
        }
    }
    Ok(())
}

type Item = Result<Batch, DataError>;

/// The producer thread and its channel, shared by both loaders.
struct Pipeline {
    rx: Option<Receiver<Item>>,
    handle: Option<JoinHandle<()>>,
    /// An error found before starting (bad config), yielded once.
    early: Option<DataError>,
    batches: usize,
    done: bool,
}

/// Makes the views of one dataset index.
type MakeViews = dyn Fn(usize) -> Result<Vec<Image>, DataError> + Send + Sync;

impl Pipeline {
    fn failed(e: DataError) -> Self {
        Pipeline { rx: None, handle: None, early: Some(e), batches: 0, done: false }
    }

    fn spawn(
        ds: Arc<dyn Dataset>,
        cfg: &DataConfig,
        batches: Vec<Vec<usize>>,
        views: usize,
        make: Arc<MakeViews>,
    ) -> Self {
        let (c, h, w) = cfg.output_shape(ds.as_ref());
        let workers = cfg.worker_threads();
        let (tx, rx) = bounded::<Item>(cfg.prefetch);
        let n_batches = batches.len();
        let handle = std::thread::Builder::new().name("locograph-data".into()).spawn(move || {
            let pool = match rayon::ThreadPoolBuilder::new()
                .num_threads(workers)
                .thread_name(|i| format!("locograph-data-{i}"))
                .build()
            {
                Ok(p) => p,
                Err(e) => {
                    let _ = tx
                        .send(Err(DataError::Config(vec![format!("cannot start {workers} data worker threads: {e}")])));
                    return;
                }
            };
            for idx in batches {
                let item = pool.install(|| assemble(ds.as_ref(), &idx, views, (c, h, w), make.as_ref()));
                let failed = item.is_err();
                // A send error means the loader was dropped: stop quietly.
                if tx.send(item).is_err() || failed {
                    return;
                }
            }
        });
        match handle {
            Ok(handle) => Pipeline { rx: Some(rx), handle: Some(handle), early: None, batches: n_batches, done: false },
            Err(e) => Pipeline::failed(DataError::Config(vec![format!("cannot start the data thread: {e}")])),
        }
    }

    fn next(&mut self) -> Option<Item> {
        if self.done {
            return None;
        }
        if let Some(e) = self.early.take() {
            self.done = true;
            return Some(Err(e));
        }
        match self.rx.as_ref()?.recv() {
            Ok(item) => {
                if item.is_err() {
                    self.done = true;
                }
                Some(item)
            }
            // The producer finished every batch.
            Err(_) => {
                self.done = true;
                None
            }
        }
    }
}

impl Drop for Pipeline {
    fn drop(&mut self) {
        // Dropping the receiver first unblocks a producer waiting on a full channel.
        self.rx.take();
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// Builds one batch: views of every index in parallel, then laid out view-major.
fn assemble(ds: &dyn Dataset, idx: &[usize], views: usize, (c, h, w): (usize, usize, usize), make: &MakeViews) -> Item {
    let per_image: Vec<Vec<Image>> = idx.par_iter().map(|&i| make(i)).collect::<Result<_, _>>()?;
    let n = idx.len();
    let size = c * h * w;
    let mut data = vec![0.0f32; views * n * size];
    for (j, imgs) in per_image.iter().enumerate() {
        for (v, img) in imgs.iter().enumerate() {
            if (img.channels, img.height, img.width) != (c, h, w) || img.data.len() != size {
                return Err(DataError::invalid(
                    ds.name(),
                    format!(
                        "image {} became {}×{}×{}, expected {c}×{h}×{w}",
                        idx[j], img.channels, img.height, img.width
                    ),
                ));
            }
            let row = v * n + j;
            data[row * size..(row + 1) * size].copy_from_slice(&img.data);
        }
    }
    let labels: Option<Vec<u32>> = idx.iter().map(|&i| ds.label(i)).collect();
    Ok(Batch { data, shape: [views * n, c, h, w], labels: labels.unwrap_or_default(), indices: idx.to_vec() })
}

fn batch_size_error(batch_size: usize, len: usize) -> Option<DataError> {
    (batch_size == 0).then(|| DataError::Config(vec![format!("batch size 0 (dataset of {len} images)")]))
}

/// Two augmented views per image, for contrastive training. Shuffled with `(seed, epoch)`;
/// the last incomplete batch is dropped (so every batch has exactly `batch_size` pairs).
pub struct PairLoader {
    inner: Pipeline,
}

impl PairLoader {
    /// Starts producing the epoch's batches in the background.
    pub fn new(ds: Arc<dyn Dataset>, cfg: &DataConfig, batch_size: usize, seed: u64, epoch: usize) -> Self {
        Self::sharded(ds, cfg, batch_size, seed, epoch, Shard::ALL)
    }

    /// [`Self::new`] for one rank of several: each batch holds only `shard`'s share of the
    /// global batch of `batch_size` images ([`Shard::range`]), with the same views one process
    /// would make of those images. The ranks' batches stacked in rank order (view 1 of all,
    /// then view 2 of all) are one process's batch.
    pub fn sharded(
        ds: Arc<dyn Dataset>,
        cfg: &DataConfig,
        batch_size: usize,
        seed: u64,
        epoch: usize,
        shard: Shard,
    ) -> Self {
        if let Some(e) = batch_size_error(batch_size, ds.len()) {
            return PairLoader { inner: Pipeline::failed(e) };
        }
        let share = match shard.range(batch_size) {
            Ok(r) => r,
            Err(e) => return PairLoader { inner: Pipeline::failed(e) },
        };
        if let Err(e) = check(cfg, ds.as_ref()) {
            return PairLoader { inner: Pipeline::failed(e) };
        }
        let epoch = epoch as u64;
        let mut order: Vec<usize> = (0..ds.len()).collect();
        // Index u64::MAX is never a dataset index, so the shuffle stream is apart from the views.
        order.shuffle(&mut sample_rng(seed, epoch, u64::MAX, 1));
        let batches: Vec<Vec<usize>> = order.chunks_exact(batch_size).map(|b| b[share.clone()].to_vec()).collect();
        let (_, h, w) = cfg.output_shape(ds.as_ref());
        let aug = cfg.augment.clone();
        let src = ds.clone();
        let make = move |i: usize| -> Result<Vec<Image>, DataError> {
            let img = src.image(i)?;
            let mut rng = sample_rng(seed, epoch, i as u64, 0);
            let v1 = aug.apply(img.clone(), h, w, &mut rng);
            let v2 = aug.apply(img, h, w, &mut rng);
            Ok(vec![v1, v2])
        };
        PairLoader { inner: Pipeline::spawn(ds, cfg, batches, 2, Arc::new(make)) }
    }

    /// Number of batches this epoch.
    pub fn num_batches(&self) -> usize {
        self.inner.batches
    }
}

impl Iterator for PairLoader {
    type Item = Result<Batch, DataError>;
    fn next(&mut self) -> Option<Self::Item> {
        self.inner.next()
    }
}

/// Plain batches for evaluation and feature extraction: no random transform, resized and
/// centre-cropped to the output size, normalised, in index order; the last batch may be short.
pub struct EvalLoader {
    inner: Pipeline,
}

impl EvalLoader {
    /// Starts producing batches in the background.
    pub fn new(ds: Arc<dyn Dataset>, cfg: &DataConfig, batch_size: usize) -> Self {
        if let Some(e) = batch_size_error(batch_size, ds.len()) {
            return EvalLoader { inner: Pipeline::failed(e) };
        }
        if let Err(e) = check(cfg, ds.as_ref()) {
            return EvalLoader { inner: Pipeline::failed(e) };
        }
        let order: Vec<usize> = (0..ds.len()).collect();
        let batches: Vec<Vec<usize>> = order.chunks(batch_size).map(<[usize]>::to_vec).collect();
        let (_, h, w) = cfg.output_shape(ds.as_ref());
        let aug = cfg.augment.clone();
        let src = ds.clone();
        let make = move |i: usize| -> Result<Vec<Image>, DataError> { Ok(vec![aug.eval(src.image(i)?, h, w)]) };
        EvalLoader { inner: Pipeline::spawn(ds, cfg, batches, 1, Arc::new(make)) }
    }

    /// Number of batches.
    pub fn num_batches(&self) -> usize {
        self.inner.batches
    }
}

impl Iterator for EvalLoader {
    type Item = Result<Batch, DataError>;
    fn next(&mut self) -> Option<Self::Item> {
        self.inner.next()
    }
}
