//! A decoder (projection head): optional residual conv block → global average pool → MLP.

use candle_core::{Module, Result, Tensor};
use serde::{Deserialize, Serialize};

use super::batch_norm::{batch_norm2d, BatchNorm2d};
use super::block::{blocks, Block, BlockKind, BlockSpec};
use super::linear::{linear, Linear};
use super::pool::global_avg_pool;
use super::{Cost, Layer, ParamBuilder};

fn two() -> usize {
    2
}
fn out_dim() -> usize {
    128
}

/// The MLP after pooling: `depth` linear layers, ReLU between them.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MlpConfig {
    /// Number of linear layers (2 = SimCLR's projection head).
    #[serde(default = "two")]
    pub depth: usize,
    /// Width of the hidden layers (default: the pooled input's width).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hidden: Option<usize>,
    /// Output dimension (the embedding the loss sees).
    #[serde(default = "out_dim")]
    pub out: usize,
    /// BatchNorm after each hidden linear layer (SimCLR v2 style).
    #[serde(default)]
    pub batch_norm: bool,
}

impl Default for MlpConfig {
    fn default() -> Self {
        Self { depth: 2, hidden: None, out: 128, batch_norm: false }
    }
}

/// The residual conv block in front of the pool (the paper's final LoCo decoder).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ConvBlockConfig {
    #[serde(default = "bottleneck")]
    pub block: BlockKind,
    /// Output channels (default: twice the input's, as a next stage would have).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channels: Option<usize>,
    /// Stride (2 = the paper's downsampling block; 1 = its "without downsampling" ablation).
    #[serde(default = "two")]
    pub stride: usize,
    /// Number of blocks (the ablation's "2 conv blocks").
    #[serde(default = "one")]
    pub blocks: usize,
}

fn bottleneck() -> BlockKind {
    BlockKind::Bottleneck
}
fn one() -> usize {
    1
}

/// `op: decoder` — e.g. `{op: decoder, mlp: {depth: 2, out: 128}}`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DecoderConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conv_block: Option<ConvBlockConfig>,
    #[serde(default)]
    pub mlp: MlpConfig,
    /// Keep the parameters fixed; gradients still flow through.
    #[serde(default)]
    pub frozen: bool,
}

impl DecoderConfig {
    /// The conv blocks in front of the pool, for an input with `in_channels` channels.
    pub fn block_specs(&self, in_channels: usize) -> Vec<BlockSpec> {
        let Some(cb) = &self.conv_block else { return vec![] };
        let out = cb.channels.unwrap_or(2 * in_channels);
        (0..cb.blocks)
            .map(|i| BlockSpec {
                kind: cb.block,
                in_channels: if i == 0 { in_channels } else { out },
                width: if cb.block == BlockKind::Basic { out } else { (out / 4).max(1) },
                out_channels: out,
                stride: if i == 0 { cb.stride } else { 1 },
                groups: 1,
                group_expand: false,
            })
            .collect()
    }

    /// Output shape: `[out]` for an input `[C, H, W]` (or a flat `[C]`).
    pub fn out_shape(&self, input: &[usize]) -> std::result::Result<Vec<usize>, String> {
        let mut why = vec![];
        if self.mlp.depth == 0 {
            why.push("`mlp.depth` must be at least 1".to_string());
        }
        if self.mlp.out == 0 || self.mlp.hidden == Some(0) {
            why.push("MLP widths must be at least 1".into());
        }
        if let Some(cb) = &self.conv_block {
            if input.len() != 3 {
                why.push(format!("a conv block needs a [C, H, W] input, got {input:?}"));
            }
            if cb.block == BlockKind::Shuffle {
                why.push("a decoder's `conv_block` is `basic` or `bottleneck`".into());
            }
            if cb.blocks == 0 || cb.stride == 0 || cb.channels == Some(0) {
                why.push(
                    "`conv_block.blocks`, `conv_block.stride` and `conv_block.channels` must be at least 1".into(),
                );
            }
        }
        if !why.is_empty() {
            return Err(why.join("; "));
        }
        Ok(vec![self.mlp.out])
    }

    /// Cost on a `[C, H, W]` or `[C]` input (which [`DecoderConfig::out_shape`] accepts).
    ///
    /// Saved: the conv blocks as [`BlockSpec::cost`] counts them (an upper bound here: a
    /// decoder runs its blocks as one piece, whose sum and ReLU candle keeps instead of the
    /// fused tail), the pooled vector, and per linear layer its matmul and bias-add outputs, a
    /// ReLU output between layers and a batch norm's four vectors where there is one.
    pub fn cost(&self, input: &[usize]) -> Cost {
        let mut cost = Cost::default();
        let mut pooled = input.first().copied().unwrap_or(0);
        if let [c, h, w] = *input {
            let (mut c, mut h, mut w) = (c, h, w);
            for spec in self.block_specs(c) {
                let (b, out) = spec.cost(h, w);
                cost += b;
                [c, h, w] = out;
            }
            pooled = c;
            cost.saved += c as u64;
        }
        let hidden = self.mlp.hidden.unwrap_or(pooled);
        for i in 0..self.mlp.depth {
            let last = i + 1 == self.mlp.depth;
            let d_in = if i == 0 { pooled } else { hidden } as u64;
            let d = if last { self.mlp.out } else { hidden } as u64;
            cost.params += d_in * d + d;
            cost.macs += d_in * d;
            let bn = self.mlp.batch_norm && !last;
            if bn {
                cost.params += 2 * d;
                cost.buffers += 2 * d;
            }
            cost.saved += d * (2 + u64::from(!last) + if bn { 4 } else { 0 });
        }
        cost.output = self.mlp.out as u64;
        cost.output_is_leaf = false;
        cost
    }

    /// Pooled width (what the MLP sees) for an input with `in_channels` channels.
    pub fn pooled_dim(&self, in_channels: usize) -> usize {
        self.block_specs(in_channels).last().map(|s| s.out_channels).unwrap_or(in_channels)
    }
}

#[derive(Clone, Debug)]
pub struct Decoder {
    blocks: Vec<Block>,
    layers: Vec<(Linear, Option<BatchNorm2d>)>,
}

/// Parameters `{path}.block{i}.…`, `{path}.mlp{i}.{weight,bias}`, `{path}.mlp_bn{i}.*`.
pub fn decoder(cfg: &DecoderConfig, in_channels: usize, pb: &ParamBuilder) -> Result<Decoder> {
    let blocks = blocks(cfg.block_specs(in_channels), pb)?;
    let pooled = cfg.pooled_dim(in_channels);
    let hidden = cfg.mlp.hidden.unwrap_or(pooled);
    let mut layers = vec![];
    for i in 0..cfg.mlp.depth {
        let d_in = if i == 0 { pooled } else { hidden };
        let last = i + 1 == cfg.mlp.depth;
        let d_out = if last { cfg.mlp.out } else { hidden };
        let lin = linear(d_in, d_out, &pb.pp(format!("mlp{i}")))?;
        let bn = if cfg.mlp.batch_norm && !last {
            Some(batch_norm2d(d_out, false, &pb.pp(format!("mlp_bn{i}")))?)
        } else {
            None
        };
        layers.push((lin, bn));
    }
    Ok(Decoder { blocks, layers })
}

impl Layer for Decoder {
    /// # Shapes
    /// `[N, C, H, W]` (or `[N, C]`) → `[N, out]`.
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let mut h = x.clone();
        for b in &self.blocks {
            h = b.forward_t(&h, train)?;
        }
        if h.rank() == 4 {
            h = global_avg_pool(&h)?;
        }
        let last = self.layers.len() - 1;
        for (i, (lin, bn)) in self.layers.iter().enumerate() {
            h = lin.forward(&h)?;
            if let Some(bn) = bn {
                let (n, c) = h.dims2()?;
                h = bn.forward_t(&h.reshape((n, c, 1, 1))?, train)?.reshape((n, c))?;
            }
            if i != last {
                h = h.relu()?;
            }
        }
        Ok(h)
    }
}
