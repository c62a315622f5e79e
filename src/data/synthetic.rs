//! A GENERATED dataset (not real data): class-conditional coloured sine gratings with random
//! phase, slight orientation jitter and pixel noise. Class `k` fixes the orientation, the spatial
//! frequency and the colour, so a linear probe can separate classes once features capture them.
//! Deterministic from `seed`: image `i` is a function of `(seed, split, i)` only, and is computed
//! on demand (nothing is stored). For tests and smoke runs.

use std::f32::consts::PI;

use rand::Rng;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::augment::sample_rng;
use super::{DataError, Dataset, Image, Split};

/// Parameters of `format: synthetic`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SyntheticConfig {
    /// Images in the train split.
    #[serde(default = "default_train")]
    pub train_size: usize,
    /// Images in the test split.
    #[serde(default = "default_test")]
    pub test_size: usize,
    /// Number of classes.
    #[serde(default = "default_classes")]
    pub classes: usize,
    /// Channels: 1 (grey) or 3 (RGB).
    #[serde(default = "default_channels")]
    pub channels: usize,
    /// Image side in pixels (square).
    #[serde(default = "default_side")]
    pub side: usize,
    /// Generator seed.
    #[serde(default)]
    pub seed: u64,
}

fn default_train() -> usize {
    1024
}
fn default_test() -> usize {
    256
}
fn default_classes() -> usize {
    10
}
fn default_channels() -> usize {
    3
}
fn default_side() -> usize {
    32
}

impl Default for SyntheticConfig {
    fn default() -> Self {
        SyntheticConfig {
            train_size: default_train(),
            test_size: default_test(),
            classes: default_classes(),
            channels: default_channels(),
            side: default_side(),
            seed: 0,
        }
    }
}

impl SyntheticConfig {
    pub(crate) fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        if self.classes == 0 || self.classes > 256 {
            p.push(format!("synthetic.classes = {}: must be in 1..=256", self.classes));
        }
        if self.channels != 1 && self.channels != 3 {
            p.push(format!("synthetic.channels = {}: must be 1 or 3", self.channels));
        }
        if self.side < 4 {
            p.push(format!("synthetic.side = {}: must be >= 4", self.side));
        }
        if self.train_size == 0 || self.test_size == 0 {
            p.push(format!(
                "synthetic.train_size = {}, test_size = {}: both must be at least 1",
                self.train_size, self.test_size
            ));
        }
        p
    }
}

/// The generated dataset of one split.
pub struct SyntheticDataset {
    cfg: SyntheticConfig,
    split: Split,
    len: usize,
}

impl SyntheticDataset {
    pub fn new(cfg: &SyntheticConfig, split: Split) -> Self {
        let len = match split {
            Split::Train => cfg.train_size,
            _ => cfg.test_size,
        };
        SyntheticDataset { cfg: cfg.clone(), split, len }
    }

    /// Class `k`'s colour: a hue wheel position turned into RGB weights in `[0.2, 1]`.
    fn colour(&self, k: usize) -> [f32; 3] {
        let h = k as f32 / self.cfg.classes as f32;
        let c = |shift: f32| 0.6 + 0.4 * (2.0 * PI * (h + shift)).cos();
        [c(0.0), c(1.0 / 3.0), c(2.0 / 3.0)]
    }
}

impl Dataset for SyntheticDataset {
    fn len(&self) -> usize {
        self.len
    }
    fn shape(&self) -> (usize, usize, usize) {
        (self.cfg.channels, self.cfg.side, self.cfg.side)
    }
    fn image(&self, i: usize) -> Result<Image, DataError> {
        let k = i % self.cfg.classes;
        let split_tag = match self.split {
            Split::Train => 0,
            Split::Test => 1,
            Split::Unlabeled | Split::TrainUnlabeled => 2,
        };
        // Stream 0x5157 keeps these draws apart from the augmentation streams.
        let mut rng = sample_rng(self.cfg.seed, split_tag, i as u64, 0x5157);
        let n = self.cfg.side;
        let theta = PI * k as f32 / self.cfg.classes as f32 + rng.gen_range(-0.1..0.1);
        let freq = 2.0 + (k % 3) as f32; // cycles per image side
        let phase = rng.gen_range(0.0..2.0 * PI);
        let amp = rng.gen_range(0.3..0.45);
        let colour = self.colour(k);
        let (ct, st) = (theta.cos(), theta.sin());
        let c = self.cfg.channels;
        let mut data = vec![0.0f32; c * n * n];
        for y in 0..n {
            for x in 0..n {
                let u = (x as f32 * ct + y as f32 * st) / n as f32;
                let s = (2.0 * PI * freq * u + phase).sin();
                for ch in 0..c {
                    let w = if c == 3 { colour[ch] } else { 1.0 };
                    let noise: f32 = rng.gen_range(-0.05..0.05);
                    data[(ch * n + y) * n + x] = (0.5 + amp * w * s + noise).clamp(0.0, 1.0);
                }
            }
        }
        Ok(Image { channels: c, height: n, width: n, data })
    }
    fn label(&self, i: usize) -> Option<u32> {
        (i < self.len).then(|| (i % self.cfg.classes) as u32)
    }
    fn num_classes(&self) -> Option<usize> {
        Some(self.cfg.classes)
    }
    fn name(&self) -> String {
        format!("synthetic (GENERATED, seed {}, {} classes, {:?})", self.cfg.seed, self.cfg.classes, self.split)
    }
}
