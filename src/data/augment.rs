//! SimCLR's random augmentation (Chen et al. 2020, appendix A), as torchvision composes it:
//!
//! `RandomResizedCrop → RandomHorizontalFlip → RandomApply(ColorJitter, p) → RandomGrayscale →
//! RandomApply(GaussianBlur, p) → Normalize`.
//!
//! Every random choice is drawn from a per-sample RNG seeded by `(seed, epoch, index)`
//! ([`sample_rng`]), so a batch is the same whatever the number of worker threads.
//! The deterministic ops are in [`super::transforms`].

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::transforms::{self as tf, Image};

/// The augmentation applied to each view. Defaults are SimCLR's ImageNet settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AugmentConfig {
    /// Output side in pixels (square). `null`: the dataset's own `H × W`.
    #[serde(default)]
    pub size: Option<usize>,
    /// Random resized crop; `null` disables it (images are then only resized/centre-cropped to
    /// the output size).
    #[serde(default = "default_crop")]
    pub crop: Option<CropConfig>,
    /// Probability of a horizontal flip.
    #[serde(default = "default_flip")]
    pub flip: f32,
    /// Colour jitter (applied with probability `jitter.p`).
    #[serde(default)]
    pub jitter: JitterConfig,
    /// Probability of converting to greyscale (3 channels kept).
    #[serde(default = "default_grayscale")]
    pub grayscale: f32,
    /// Gaussian blur (applied with probability `blur.p`).
    #[serde(default)]
    pub blur: BlurConfig,
    /// Per-channel normalisation after the augmentation; `null`: values stay in `[0, 1]`
    /// (SimCLR's own code does not normalise).
    #[serde(default)]
    pub normalize: Option<NormalizeConfig>,
    /// Replicate a 1-channel image to 3 channels before augmenting, so that saturation, hue
    /// and greyscale act (on 1 channel the jitter does brightness and contrast only).
    #[serde(default)]
    pub to_rgb: bool,
}

/// `RandomResizedCrop(size, scale, ratio)` parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CropConfig {
    /// Range of the crop's area as a fraction of the image.
    #[serde(default = "default_scale")]
    pub scale: [f32; 2],
    /// Range of the crop's aspect ratio (width / height), sampled log-uniformly.
    #[serde(default = "default_ratio")]
    pub ratio: [f32; 2],
}

/// `ColorJitter(brightness, contrast, saturation, hue)` applied with probability `p`, the four
/// in a random order (as torchvision). A factor of 0 disables that adjustment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct JitterConfig {
    /// Brightness factor drawn from `[max(0, 1 - b), 1 + b]`.
    #[serde(default = "default_bcs")]
    pub brightness: f32,
    /// Contrast factor drawn from `[max(0, 1 - c), 1 + c]`.
    #[serde(default = "default_bcs")]
    pub contrast: f32,
    /// Saturation factor drawn from `[max(0, 1 - s), 1 + s]` (no effect on 1 channel).
    #[serde(default = "default_bcs")]
    pub saturation: f32,
    /// Hue shift drawn from `[-h, h]` turns, `h <= 0.5` (no effect on 1 channel).
    #[serde(default = "default_hue")]
    pub hue: f32,
    /// Probability of applying the jitter at all.
    #[serde(default = "default_jitter_p")]
    pub p: f32,
}

/// `GaussianBlur(kernel_size, sigma)` applied with probability `p`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct BlurConfig {
    /// Probability of blurring.
    #[serde(default = "default_blur_p")]
    pub p: f32,
    /// Range of the Gaussian's standard deviation, in pixels.
    #[serde(default = "default_sigma")]
    pub sigma: [f32; 2],
    /// Odd kernel side; `null`: about 10% of the output side, as SimCLR
    /// (`2 * (side / 10 / 2) + 1`, e.g. 23 at 224, 3 at 32).
    #[serde(default)]
    pub kernel_size: Option<usize>,
}

/// `Normalize(mean, std)`, one value per output channel.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct NormalizeConfig {
    /// Per-channel mean subtracted.
    pub mean: Vec<f32>,
    /// Per-channel standard deviation divided by.
    pub std: Vec<f32>,
}

// --- SimCLR defaults (appendix A of the SimCLR paper; strength s = 1) ---
fn default_crop() -> Option<CropConfig> {
    Some(CropConfig::default())
}
fn default_scale() -> [f32; 2] {
    [0.08, 1.0] // fraction of the image area
}
fn default_ratio() -> [f32; 2] {
    [3.0 / 4.0, 4.0 / 3.0] // width / height
}
fn default_flip() -> f32 {
    0.5
}
fn default_bcs() -> f32 {
    0.8 // 0.8 * s
}
fn default_hue() -> f32 {
    0.2 // 0.2 * s
}
fn default_jitter_p() -> f32 {
    0.8
}
fn default_grayscale() -> f32 {
    0.2
}
fn default_blur_p() -> f32 {
    0.5
}
fn default_sigma() -> [f32; 2] {
    [0.1, 2.0] // pixels
}

impl Default for CropConfig {
    fn default() -> Self {
        CropConfig { scale: default_scale(), ratio: default_ratio() }
    }
}

impl Default for JitterConfig {
    fn default() -> Self {
        JitterConfig {
            brightness: default_bcs(),
            contrast: default_bcs(),
            saturation: default_bcs(),
            hue: default_hue(),
            p: default_jitter_p(),
        }
    }
}

impl Default for BlurConfig {
    fn default() -> Self {
        BlurConfig { p: default_blur_p(), sigma: default_sigma(), kernel_size: None }
    }
}

impl Default for AugmentConfig {
    fn default() -> Self {
        AugmentConfig {
            size: None,
            crop: default_crop(),
            flip: default_flip(),
            jitter: JitterConfig::default(),
            grayscale: default_grayscale(),
            blur: BlurConfig::default(),
            normalize: None,
            to_rgb: false,
        }
    }
}

/// A per-sample RNG, independent of which thread draws it and of every other sample.
/// The 32-byte ChaCha seed is `seed ‖ epoch ‖ index ‖ stream` (little-endian), so distinct
/// triples can never share a stream (no hashing, no collisions).
pub fn sample_rng(seed: u64, epoch: u64, index: u64, stream: u64) -> ChaCha8Rng {
    let mut key = [0u8; 32];
    key[0..8].copy_from_slice(&seed.to_le_bytes());
    key[8..16].copy_from_slice(&epoch.to_le_bytes());
    key[16..24].copy_from_slice(&index.to_le_bytes());
    key[24..32].copy_from_slice(&stream.to_le_bytes());
    ChaCha8Rng::from_seed(key)
}

/// `torch.empty(1).uniform_(lo, hi)`; a degenerate range gives `lo`.
fn uniform(rng: &mut impl Rng, lo: f32, hi: f32) -> f32 {
    if hi > lo {
        rng.gen_range(lo..hi)
    } else {
        lo
    }
}

/// Python's `round` (half to even), which torchvision's crop sizes use.
fn py_round(x: f64) -> usize {
    x.round_ties_even().max(0.0) as usize
}

/// `RandomResizedCrop.get_params`: `(top, left, h, w)` of the crop. Ten tries at a random
/// area/aspect, then a centre crop with the ratio clamped into range (torchvision's fallback).
pub fn crop_params(
    rng: &mut impl Rng,
    height: usize,
    width: usize,
    scale: [f32; 2],
    ratio: [f32; 2],
) -> (usize, usize, usize, usize) {
    let area = (height * width) as f64;
    let (lr0, lr1) = (ratio[0].ln(), ratio[1].ln());
    for _ in 0..10 {
        let target_area = area * f64::from(uniform(rng, scale[0], scale[1]));
        let aspect = f64::from(uniform(rng, lr0, lr1).exp());
        let w = py_round((target_area * aspect).sqrt());
        let h = py_round((target_area / aspect).sqrt());
        if 0 < w && w <= width && 0 < h && h <= height {
            let top = rng.gen_range(0..=height - h);
            let left = rng.gen_range(0..=width - w);
            return (top, left, h, w);
        }
    }
    let in_ratio = width as f64 / height as f64;
    let (rmin, rmax) = (f64::from(ratio[0]), f64::from(ratio[1]));
    let (h, w) = if in_ratio < rmin {
        (py_round(width as f64 / rmin).clamp(1, height), width)
    } else if in_ratio > rmax {
        (height, py_round(height as f64 * rmax).clamp(1, width))
    } else {
        (height, width)
    };
    ((height - h) / 2, (width - w) / 2, h, w)
}

/// SimCLR's kernel side for a given image side: 10% of it, made odd.
pub fn simclr_kernel_size(side: usize) -> usize {
    2 * (side / 10 / 2) + 1
}

/// Brings an image to `out_h × out_w` without randomness: torchvision's
/// `Resize(size) + CenterCrop(size)` for a square output, a plain resize otherwise.
pub fn fit(img: Image, out_h: usize, out_w: usize) -> Image {
    if img.height == out_h && img.width == out_w {
        img
    } else if out_h == out_w {
        tf::center_resize(&img, out_h)
    } else {
        tf::resize(&img, out_h, out_w)
    }
}

impl AugmentConfig {
    /// No random transform at all (only `size`, `to_rgb` and `normalize` act).
    pub fn none() -> Self {
        AugmentConfig {
            size: None,
            crop: None,
            flip: 0.0,
            jitter: JitterConfig { p: 0.0, ..JitterConfig::default() },
            grayscale: 0.0,
            blur: BlurConfig { p: 0.0, ..BlurConfig::default() },
            normalize: None,
            to_rgb: false,
        }
    }

    /// Every range or probability out of bounds, as readable sentences.
    pub fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        let prob = |name: &str, v: f32, p: &mut Vec<String>| {
            if !(0.0..=1.0).contains(&v) {
                p.push(format!("augment.{name} = {v}: a probability must be in [0, 1]"));
            }
        };
        if self.size == Some(0) {
            p.push("augment.size must be > 0".into());
        }
        if let Some(c) = &self.crop {
            if !(c.scale[0] > 0.0 && c.scale[0] <= c.scale[1] && c.scale[1] <= 1.0) {
                p.push(format!("augment.crop.scale = {:?}: need 0 < min <= max <= 1", c.scale));
            }
            if !(c.ratio[0] > 0.0 && c.ratio[0] <= c.ratio[1]) {
                p.push(format!("augment.crop.ratio = {:?}: need 0 < min <= max", c.ratio));
            }
        }
        prob("flip", self.flip, &mut p);
        prob("grayscale", self.grayscale, &mut p);
        prob("jitter.p", self.jitter.p, &mut p);
        prob("blur.p", self.blur.p, &mut p);
        let j = &self.jitter;
        for (name, v) in [("brightness", j.brightness), ("contrast", j.contrast), ("saturation", j.saturation)] {
            if v.is_nan() || v < 0.0 {
                p.push(format!("augment.jitter.{name} = {v}: must be >= 0"));
            }
        }
        if !(0.0..=0.5).contains(&j.hue) {
            p.push(format!("augment.jitter.hue = {}: must be in [0, 0.5]", j.hue));
        }
        let s = self.blur.sigma;
        if !(s[0] > 0.0 && s[0] <= s[1]) {
            p.push(format!("augment.blur.sigma = {s:?}: need 0 < min <= max"));
        }
        if let Some(k) = self.blur.kernel_size {
            if k % 2 == 0 {
                p.push(format!("augment.blur.kernel_size = {k}: must be odd"));
            }
        }
        if let Some(n) = &self.normalize {
            if n.mean.len() != n.std.len() {
                p.push(format!("augment.normalize: {} means but {} stds", n.mean.len(), n.std.len()));
            }
            if n.std.iter().any(|&s| s.is_nan() || s <= 0.0) {
                p.push("augment.normalize.std: every value must be > 0".into());
            }
        }
        p
    }

    /// One random view of `img` at `out_h × out_w`, drawing from `rng`.
    pub fn apply(&self, img: Image, out_h: usize, out_w: usize, rng: &mut impl Rng) -> Image {
        let img = if self.to_rgb { img.to_rgb() } else { img };
        let mut img = match &self.crop {
            Some(c) => {
                let (t, l, h, w) = crop_params(rng, img.height, img.width, c.scale, c.ratio);
                tf::resized_crop(&img, t, l, h, w, out_h, out_w)
            }
            None => fit(img, out_h, out_w),
        };
        if rng.gen::<f32>() < self.flip {
            tf::hflip(&mut img);
        }
        if rng.gen::<f32>() < self.jitter.p {
            self.jitter.apply(&mut img, rng);
        }
        if rng.gen::<f32>() < self.grayscale {
            tf::grayscale(&mut img);
        }
        if rng.gen::<f32>() < self.blur.p {
            let k = self.blur.kernel_size.unwrap_or_else(|| simclr_kernel_size(out_h.min(out_w)));
            let sigma = uniform(rng, self.blur.sigma[0], self.blur.sigma[1]);
            if k > 1 {
                tf::gaussian_blur(&mut img, k, sigma);
            }
        }
        self.finish(&mut img);
        img
    }

    /// The evaluation view: grey → RGB if asked, resize/centre-crop to the output size,
    /// normalise. No randomness.
    pub fn eval(&self, img: Image, out_h: usize, out_w: usize) -> Image {
        let img = if self.to_rgb { img.to_rgb() } else { img };
        let mut img = fit(img, out_h, out_w);
        self.finish(&mut img);
        img
    }

    fn finish(&self, img: &mut Image) {
        if let Some(n) = &self.normalize {
            tf::normalize(img, &n.mean, &n.std);
        }
    }
}

impl JitterConfig {
    /// `ColorJitter.forward`: a random permutation of the four ops, each factor drawn once.
    fn apply(&self, img: &mut Image, rng: &mut impl Rng) {
        let mut order = [0usize, 1, 2, 3];
        order.shuffle(rng);
        // torchvision draws each factor from [max(0, 1 - v), 1 + v]; v = 0 means "off".
        let mut factor = |v: f32| (v > 0.0).then(|| uniform(rng, (1.0 - v).max(0.0), 1.0 + v));
        let b = factor(self.brightness);
        let c = factor(self.contrast);
        let s = factor(self.saturation);
        let h = (self.hue > 0.0).then(|| uniform(rng, -self.hue, self.hue));
        for op in order {
            match (op, b, c, s, h) {
                (0, Some(f), ..) => tf::adjust_brightness(img, f),
                (1, _, Some(f), ..) => tf::adjust_contrast(img, f),
                (2, _, _, Some(f), _) => tf::adjust_saturation(img, f),
                (3, .., Some(f)) => tf::adjust_hue(img, f),
                _ => {}
            }
        }
    }
}
