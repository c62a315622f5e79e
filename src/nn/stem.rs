//! The stem in front of res2: ImageNet (7×7/2 conv + 3×3/2 max pool), ShuffleNet's (3×3/2 conv +
//! 3×3/2 max pool) or small-image (3×3/1).

use candle_core::{Module, Result, Tensor};
use serde::{Deserialize, Serialize};

use super::batch_norm::{batch_norm2d, BatchNorm2d};
use super::block::CONV_BN_SAVED;
use super::conv::{conv2d, Conv2d, ConvSpec};
use super::pool::max_pool2d;
use super::stem_pool_op::BnReluMaxPool;
use super::{Cost, Layer, ParamBuilder};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum StemKind {
    /// 7×7 conv, stride 2, BN, ReLU, 3×3 max pool, stride 2: 224 → 56.
    Imagenet,
    /// 3×3 conv, stride 1, BN, ReLU, no pool (CIFAR-style ResNets, 28–96 px inputs).
    Small,
    /// 3×3 conv, stride 2, BN, ReLU, 3×3 max pool, stride 2: 224 → 56 (ShuffleNet v1/v2's conv1
    /// and max pool).
    Shufflenet,
}

impl StemKind {
    /// Ends in the 3×3/2 max pool.
    pub fn pools(&self) -> bool {
        matches!(self, StemKind::Imagenet | StemKind::Shufflenet)
    }
}

fn sixty_four() -> usize {
    64
}

/// `op: stem` — e.g. `{op: stem, kind: imagenet, channels: 64}`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StemConfig {
    pub kind: StemKind,
    /// Output channels.
    #[serde(default = "sixty_four")]
    pub channels: usize,
    /// Keep the parameters fixed (BatchNorm in eval mode); gradients still flow through.
    #[serde(default)]
    pub frozen: bool,
}

impl StemConfig {
    pub fn conv_spec(&self, in_channels: usize) -> ConvSpec {
        match self.kind {
            StemKind::Imagenet => ConvSpec::new(in_channels, self.channels, 7, 2),
            StemKind::Small => ConvSpec::new(in_channels, self.channels, 3, 1),
            StemKind::Shufflenet => ConvSpec::new(in_channels, self.channels, 3, 2),
        }
    }
    /// Cost on a `[C, H, W]` input (which [`StemConfig::out_shape`] accepts). Saved in
    /// training: a pooling stem's conv output, then its max pool's output and the u32 argmax
    /// positions (same size; `nn::stem_pool_op`: the normalised map is never kept); the small
    /// stem's conv output and its batch norm + ReLU output.
    pub fn cost(&self, input: [usize; 3]) -> Cost {
        let s = self.conv_spec(input[0]);
        let (h, w) = (s.out_size(input[1]), s.out_size(input[2]));
        let conv_out = (s.out_channels * h * w) as u64;
        let (saved, output) = if self.kind.pools() {
            let pooled = (s.out_channels * ((h - 1) / 2 + 1) * ((w - 1) / 2 + 1)) as u64;
            (conv_out + 2 * pooled, pooled)
        } else {
            (conv_out * CONV_BN_SAVED, conv_out)
        };
        Cost {
            params: s.params() + 2 * s.out_channels as u64,
            buffers: 2 * s.out_channels as u64,
            macs: s.macs(h, w),
            saved,
            output,
            ..Cost::default()
        }
    }

    pub fn out_shape(&self, input: [usize; 3]) -> std::result::Result<[usize; 3], String> {
        let [c, h, w] = input;
        if self.channels == 0 {
            return Err("`channels` must be at least 1".into());
        }
        let conv = self.conv_spec(c);
        if h < conv.kernel.saturating_sub(2 * conv.padding) || w < conv.kernel.saturating_sub(2 * conv.padding) {
            return Err(format!("input {h}×{w} is smaller than the stem's {0}×{0} kernel", conv.kernel));
        }
        let (h, w) = (conv.out_size(h), conv.out_size(w));
        Ok(if self.kind.pools() { [self.channels, (h - 1) / 2 + 1, (w - 1) / 2 + 1] } else { [self.channels, h, w] })
    }
}

#[derive(Clone, Debug)]
pub struct Stem {
    kind: StemKind,
    conv: Conv2d,
    bn: BatchNorm2d,
}

/// Parameters `{path}.conv.weight`, `{path}.bn.*`.
pub fn stem(cfg: &StemConfig, in_channels: usize, pb: &ParamBuilder) -> Result<Stem> {
    Ok(Stem {
        kind: cfg.kind,
        conv: conv2d(cfg.conv_spec(in_channels), &pb.pp("conv"))?,
        bn: batch_norm2d(cfg.channels, false, &pb.pp("bn"))?,
    })
}

impl Stem {
    pub fn kind(&self) -> StemKind {
        self.kind
    }
    pub fn conv(&self) -> &Conv2d {
        &self.conv
    }
    pub fn bn(&self) -> &BatchNorm2d {
        &self.bn
    }
}

impl Layer for Stem {
    /// # Shapes
    /// ImageNet and ShuffleNet: `[N, 3, 224, 224]` → `[N, 64, 56, 56]`; small: `[N, C, H, W]` →
    /// `[N, 64, H, W]`.
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let z = self.conv.forward(x)?;
        if train && self.kind.pools() {
            // Batch norm, ReLU and max pool as one op: the full-size normalised map is never
            // kept for the backward (`nn::stem_pool_op`). Where that op does not run (not CPU
            // f32/f64), the composed path below gives the same values.
            if let Some(op) = self.bn.fused_train_op(&z)? {
                let op = BnReluMaxPool::new(op, &z, 3, 2, 1)?;
                let (gamma, beta) = self.bn.affine(z.dtype())?;
                return op.apply(&z, &gamma, &beta);
            }
        }
        let h = self.bn.forward_relu_t(&z, train)?;
        if self.kind.pools() {
            max_pool2d(&h, 3, 2, 1)
        } else {
            Ok(h)
        }
    }
}
