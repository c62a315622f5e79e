//! A stage: optional bilinear downsampling, then `blocks` residual blocks or shuffle units, then
//! optionally a 1×1 conv (ShuffleNet v2's last conv).

use candle_core::{Module, Result, Tensor, Var};
use serde::{Deserialize, Serialize};

use super::batch_norm::{batch_norm2d, BatchNorm2d};
use super::block::{blocks, Block, BlockKind, BlockSpec, CONV_BN_SAVED};
use super::conv::{conv2d, Conv2d, ConvSpec};
use super::layer::Layer;
use super::link::Link;
use super::resize::resize_bilinear;
use super::{Cost, ParamBuilder};

fn one() -> usize {
    1
}

/// `op: stage` — e.g. ResNet-50's res3: `{op: stage, block: bottleneck, blocks: 4, channels: 512, stride: 2}`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StageConfig {
    /// Residual block type.
    pub block: BlockKind,
    /// Number of blocks.
    pub blocks: usize,
    /// Output channels of every block.
    pub channels: usize,
    /// Inner width of a bottleneck (default `channels / 4`); basic blocks ignore it, shuffle
    /// units take half of `channels`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub width: Option<usize>,
    /// Stride of the first block (2 halves the feature map).
    #[serde(default = "one")]
    pub stride: usize,
    /// Resize the input bilinearly to `resize × resize` before the first block
    /// (Progressive ResNet-50's downsampling); excludes `stride`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resize: Option<usize>,
    /// Groups of the 3×3 convolutions (and of a bottleneck's first 1×1).
    #[serde(default = "one")]
    pub groups: usize,
    /// Group a bottleneck's last 1×1 too, in every block but the first (PResNet-50 res5–res7).
    #[serde(default)]
    pub group_expand: bool,
    /// After the last block, a 1×1 conv → batch norm → ReLU to this many channels, which are then
    /// the stage's output (ShuffleNet v2's last conv: 2048 in ShuffleNet v2-50).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub final_conv: Option<usize>,
    /// Expected input channels; inferred from the producer when absent, checked when given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub in_channels: Option<usize>,
    /// Keep this node's parameters fixed (not optimised, no weight decay, BatchNorm in eval
    /// mode). Unlike a stop edge, gradients still flow *through* a frozen node.
    #[serde(default)]
    pub frozen: bool,
}

impl StageConfig {
    /// The block specs for an input with `in_channels` channels.
    pub fn block_specs(&self, in_channels: usize) -> Vec<BlockSpec> {
        let width = match self.block {
            BlockKind::Basic => self.channels,
            BlockKind::Bottleneck => self.width.unwrap_or(self.channels / 4),
            BlockKind::Shuffle => self.channels / 2,
        };
        (0..self.blocks)
            .map(|i| BlockSpec {
                kind: self.block,
                in_channels: if i == 0 { in_channels } else { self.channels },
                width,
                out_channels: self.channels,
                stride: if i == 0 && self.resize.is_none() { self.stride } else { 1 },
                groups: self.groups,
                group_expand: self.group_expand && i > 0,
            })
            .collect()
    }

    /// Cost on a `[C, H, W]` input (which [`StageConfig::out_shape`] accepts): the bilinear
    /// resize (the row-resized intermediate and the output; a side already at the size is
    /// skipped), then each block's [`BlockSpec::cost`].
    /// The final 1×1 conv for `channels` inputs, when there is one.
    pub fn final_conv_spec(&self) -> Option<ConvSpec> {
        self.final_conv.map(|out| ConvSpec::new(self.channels, out, 1, 1))
    }

    pub fn cost(&self, input: [usize; 3]) -> Cost {
        let [c, mut h, mut w] = input;
        let mut cost = Cost::default();
        if let Some(r) = self.resize {
            // Columns first ([C, H, r]), then rows ([C, r, r]).
            if w != r {
                cost.saved += (c * h * r) as u64;
            }
            if h != r {
                cost.saved += (c * r * r) as u64;
            }
            (h, w) = (r, r);
        }
        for spec in self.block_specs(c) {
            let (b, out) = spec.cost(h, w);
            cost += b;
            (h, w) = (out[1], out[2]);
        }
        if let Some(f) = self.final_conv_spec() {
            // The conv's output and the batch norm + ReLU's (the stage's output, not a leaf).
            let out = (f.out_channels * h * w) as u64;
            cost += Cost {
                params: f.params() + 2 * f.out_channels as u64,
                buffers: 2 * f.out_channels as u64,
                macs: f.macs(h, w),
                saved: out * CONV_BN_SAVED,
                output: out,
                paper: out,
                ..Cost::default()
            };
        }
        cost
    }

    /// Output `[C, H, W]` for an input `[C, H, W]`, or what does not fit.
    pub fn out_shape(&self, input: [usize; 3]) -> std::result::Result<[usize; 3], String> {
        let [c, h, w] = input;
        let mut why = vec![];
        if self.blocks == 0 {
            why.push("`blocks` must be at least 1".to_string());
        }
        if self.channels == 0 || self.width == Some(0) {
            why.push("`channels` and `width` must be at least 1".to_string());
        }
        if let Some(ic) = self.in_channels {
            if ic != c {
                why.push(format!("in_channels is {ic} but the input has {c} channels"));
            }
        }
        if self.resize.is_some() && self.stride != 1 {
            why.push("`resize` and `stride` exclude each other".into());
        }
        if self.stride == 0 {
            why.push("`stride` must be at least 1".into());
        }
        if self.final_conv == Some(0) {
            why.push("`final_conv` must be at least 1".into());
        }
        if self.block == BlockKind::Shuffle {
            if self.width.is_some() || self.groups != 1 || self.group_expand {
                why.push("a shuffle stage takes no `width`, `groups` or `group_expand`: its branches are half of `channels`, its 3×3 convs depthwise".into());
            }
            for s in self.block_specs(c) {
                if let Err(e) = s.shuffle().check() {
                    why.push(e);
                }
            }
        }
        for s in self.block_specs(c).iter().filter(|s| s.kind != BlockKind::Shuffle) {
            for conv in s.convs() {
                if conv.groups == 0 || conv.in_channels % conv.groups != 0 || conv.out_channels % conv.groups != 0 {
                    why.push(format!(
                        "groups {} must divide the channels of every grouped convolution ({} → {})",
                        conv.groups, conv.in_channels, conv.out_channels
                    ));
                    break;
                }
            }
        }
        if !why.is_empty() {
            why.dedup();
            return Err(why.join("; "));
        }
        let (h, w) = match self.resize {
            Some(r) => (r, r),
            None => ((h + 2 - 3) / self.stride + 1, (w + 2 - 3) / self.stride + 1),
        };
        Ok([self.final_conv.unwrap_or(self.channels), h, w])
    }
}

/// A built stage.
#[derive(Clone, Debug)]
pub struct Stage {
    resize: Option<usize>,
    blocks: Vec<Block>,
    final_conv: Option<(Conv2d, BatchNorm2d)>,
}

/// Parameters `{path}.block{i}.…`; the final 1×1's `{path}.conv.weight`, `{path}.bn.*`.
pub fn stage(cfg: &StageConfig, in_channels: usize, pb: &ParamBuilder) -> Result<Stage> {
    let blocks = blocks(cfg.block_specs(in_channels), pb)?;
    let final_conv = match cfg.final_conv_spec() {
        Some(s) => Some((conv2d(s, &pb.pp("conv"))?, batch_norm2d(s.out_channels, false, &pb.pp("bn"))?)),
        None => None,
    };
    Ok(Stage { resize: cfg.resize, blocks, final_conv })
}

impl Stage {
    pub fn blocks(&self) -> &[Block] {
        &self.blocks
    }
    pub fn resize(&self) -> Option<usize> {
        self.resize
    }
    /// The final 1×1 conv and its batch norm (ReLU after), when the stage has one.
    pub fn final_conv(&self) -> Option<&(Conv2d, BatchNorm2d)> {
        self.final_conv.as_ref()
    }

    /// The stage's input as its first block sees it (bilinearly resized in PResNet-50).
    pub fn resize_input(&self, x: &Tensor) -> Result<Tensor> {
        match self.resize {
            Some(r) => resize_bilinear(x, r, r),
            None => Ok(x.clone()),
        }
    }
}

/// One link per block (the resize belongs to the first) and one for the final conv, so that the
/// engine's last backward frees each block's activations as soon as the block is done.
impl Layer for Stage {
    /// # Shapes
    /// `[N, in, H, W]` → `[N, channels, H', W']` (see [`StageConfig::out_shape`]).
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let mut h = self.resize_input(x)?;
        for b in &self.blocks {
            h = b.forward_t(&h, train)?;
        }
        match &self.final_conv {
            Some((conv, bn)) => bn.forward_relu_t(&conv.forward(&h)?, train),
            None => Ok(h),
        }
    }

    fn links(&self) -> usize {
        (self.blocks.len() + usize::from(self.final_conv.is_some())).max(1)
    }

    fn forward_link(&self, k: usize, input: Option<Var>, x: &Tensor, train: bool) -> Result<Link> {
        if let (Some((conv, bn)), true) = (&self.final_conv, k == self.blocks.len()) {
            return Ok(Link::plain(input, bn.forward_relu_t(&conv.forward(x)?, train)?));
        }
        let Some(block) = self.blocks.get(k) else {
            candle_core::bail!("a stage of {} blocks has no link {k}", self.blocks.len())
        };
        if k == 0 {
            block.forward_link(input, &self.resize_input(x)?, train)
        } else {
            block.forward_link(input, x, train)
        }
    }
}
