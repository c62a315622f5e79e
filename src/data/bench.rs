//! Augmentation throughput, for `benches/` and the CLI: how many augmented views per second the
//! loader produces on generated images, so it can be compared with the training step's rate.

use std::sync::Arc;
use std::time::Instant;

use super::{DataConfig, DataError, DataFormat, PairLoader, SyntheticConfig};

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
