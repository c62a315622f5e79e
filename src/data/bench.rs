//! Augmentation throughput, for `benches/` and the CLI: how many augmented views per second the
//! loader produces on generated images, so it can be compared with the training step's rate.

use std::sync::Arc;
use std::time::Instant;

use super::{DataConfig, DataError, DataFormat, Dataset, Image, NormalizeConfig, PairLoader, SyntheticConfig};

/// One measurement.
#[derive(Debug, Clone, PartialEq)]
pub struct BenchResult {
    /// Image side (input and output).
    pub side: usize,
    /// Worker threads.
    pub threads: usize,
    /// Augmented views produced (2 per image).
    pub views: usize,
    /// Wall-clock seconds.
    pub seconds: f64,
}

impl BenchResult {
    /// Augmented views per second.
    pub fn views_per_second(&self) -> f64 {
        self.views as f64 / self.seconds.max(1e-9)
    }
}

/// Runs SimCLR's default augmentation (two views per image) over `images` generated RGB images
/// of `side × side` with `threads` workers, through the real [`PairLoader`].
pub fn bench_augment(side: usize, threads: usize, images: usize) -> Result<BenchResult, DataError> {
    let mut cfg = DataConfig::new(DataFormat::Synthetic, None);
    cfg.synthetic = SyntheticConfig { train_size: images, side, ..SyntheticConfig::default() };
    cfg.workers = threads;
    let ds = super::open(&cfg, std::path::Path::new("."), None)?;
    let batch = 32.min(images.max(1));
    let start = Instant::now();
    let mut views = 0;
    for b in PairLoader::new(Arc::clone(&ds), &cfg, batch, 0, 0) {
        views += b?.shape[0];
    }
    Ok(BenchResult { side, threads, views, seconds: start.elapsed().as_secs_f64() })
}

/// Byte `c` of pixel `(y, x)` of generated source image `i`: the formula
/// `bench/torchvision_augment.py` uses too, so both sides of the benchmark augment the same
/// pixels.
pub fn source_pixel(i: usize, y: usize, x: usize, c: usize) -> u8 {
    (((x * 7 + y * 13 + c * 29 + i * 31) ^ ((x * y) >> 3)) & 255) as u8
}

/// Distinct images in a [`SourceImages`] pool (image `i` is pool image `i % POOL`), as in the
/// Python script.
pub const POOL: usize = 64;

/// Already-decoded RGB `u8` images (interleaved HWC, the layout of a decoded PNG/JPEG) of side
/// `side`, held in memory: what an image-folder or CIFAR loader hands the augmentation, without
/// the file I/O.
pub struct SourceImages {
    side: usize,
    len: usize,
    pool: Vec<Vec<u8>>,
}

impl SourceImages {
    /// `len` images of `side × side`, cycling over [`POOL`] generated ones.
    pub fn new(side: usize, len: usize) -> Self {
        let pool = (0..POOL)
            .map(|i| {
                let mut b = Vec::with_capacity(side * side * 3);
                for y in 0..side {
                    for x in 0..side {
                        b.extend((0..3).map(|c| source_pixel(i, y, x, c)));
                    }
                }
                b
            })
            .collect();
        SourceImages { side, len, pool }
    }
}

impl Dataset for SourceImages {
    fn len(&self) -> usize {
        self.len
    }
    fn shape(&self) -> (usize, usize, usize) {
        (3, self.side, self.side)
    }
    fn image(&self, i: usize) -> Result<Image, DataError> {
        Ok(Image::from_u8_hwc(3, self.side, self.side, &self.pool[i % POOL]))
    }
    fn label(&self, _: usize) -> Option<u32> {
        None
    }
    fn num_classes(&self) -> Option<usize> {
        None
    }
    fn name(&self) -> String {
        format!("generated {0}×{0} RGB u8 source images", self.side)
    }
}

/// ImageNet's per-channel mean and standard deviation, as torchvision's `Normalize` examples.
pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
/// See [`IMAGENET_MEAN`].
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

/// SimCLR's full pipeline as `bench/torchvision_augment.py` runs it: random resized crop of a
/// `source × source` decoded `u8` RGB image to `side × side`, flip, jitter, greyscale, blur,
/// ImageNet normalisation; two views per image, `images` images in batches of 32, through the
/// real [`PairLoader`] with `threads` workers.
pub fn bench_simclr(side: usize, source: usize, threads: usize, images: usize) -> Result<BenchResult, DataError> {
    let mut cfg = DataConfig::new(DataFormat::Synthetic, None);
    cfg.workers = threads;
    cfg.augment.size = Some(side);
    cfg.augment.normalize = Some(NormalizeConfig { mean: IMAGENET_MEAN.to_vec(), std: IMAGENET_STD.to_vec() });
    let ds: Arc<dyn Dataset> = Arc::new(SourceImages::new(source, images));
    let batch = 32.min(images.max(1));
    let start = Instant::now();
    let mut views = 0;
    for b in PairLoader::new(ds, &cfg, batch, 0, 0) {
        views += b?.shape[0];
    }
    Ok(BenchResult { side, threads, views, seconds: start.elapsed().as_secs_f64() })
}
