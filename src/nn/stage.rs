//! A ResNet stage: optional bilinear downsampling, then `blocks` residual blocks.

use candle_core::{Result, Tensor, Var};
use serde::{Deserialize, Serialize};

use super::block::{blocks, Block, BlockKind, BlockSpec};
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
    /// Inner width of a bottleneck (default `channels / 4`); basic blocks ignore it.
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
        for s in self.block_specs(c) {
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
        Ok([self.channels, h, w])
    }
}

/// A built stage.
#[derive(Clone, Debug)]
pub struct Stage {
    resize: Option<usize>,
    blocks: Vec<Block>,
}

/// Parameters `{path}.block{i}.…`.
pub fn stage(cfg: &StageConfig, in_channels: usize, pb: &ParamBuilder) -> Result<Stage> {
    let blocks = blocks(cfg.block_specs(in_channels), pb)?;
    Ok(Stage { resize: cfg.resize, blocks })
}

impl Stage {
    pub fn blocks(&self) -> &[Block] {
        &self.blocks
    }
    pub fn resize(&self) -> Option<usize> {
        self.resize
    }

    /// The stage's input as its first block sees it (bilinearly resized in PResNet-50).
    pub fn resize_input(&self, x: &Tensor) -> Result<Tensor> {
        match self.resize {
            Some(r) => resize_bilinear(x, r, r),
            None => Ok(x.clone()),
        }
    }
}

/// One link per residual block (the resize belongs to the first), so that the engine's last
/// backward frees each block's activations as soon as the block is done.
impl Layer for Stage {
    /// # Shapes
    /// `[N, in, H, W]` → `[N, channels, H', W']` (see [`StageConfig::out_shape`]).
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let mut h = self.resize_input(x)?;
        for b in &self.blocks {
            h = b.forward_t(&h, train)?;
        }
        Ok(h)
    }

    fn links(&self) -> usize {
        self.blocks.len().max(1)
    }

    fn forward_link(&self, k: usize, input: Option<Var>, x: &Tensor, train: bool) -> Result<Link> {
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
