//! The blocks of a stage: residual basic (ResNet-18/34) and bottleneck (ResNet-50, v1.5: stride
//! on the 3×3) blocks, and ShuffleNet v2's units (`nn::shuffle`).

use candle_core::{Module, Result, Tensor, Var};
use serde::{Deserialize, Serialize};

use super::batch_norm::{batch_norm2d, BatchNorm2d};
use super::conv::{conv2d, Conv2d, ConvSpec};
use super::link::Link;
use super::shuffle::{halves, ShuffleSpec};
use super::{Cost, ParamBuilder};

pub(crate) use super::cost::CONV_BN_SAVED;

/// Which block a stage is made of.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum BlockKind {
    /// 3×3 → 3×3 (ResNet-18/34; PResNet-50 res2/res3).
    Basic,
    /// 1×1 → 3×3 → 1×1 (ResNet-50 and up).
    Bottleneck,
    /// ShuffleNet v2's unit: channel split (or two branches), 1×1 → 3×3 depthwise → 1×1,
    /// concatenation and channel shuffle (`nn::shuffle`).
    Shuffle,
}

/// Everything that fixes one block's shapes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockSpec {
    pub kind: BlockKind,
    pub in_channels: usize,
    /// Inner width of a bottleneck (equal to `out_channels` for a basic block, half of it for a
    /// shuffle unit).
    pub width: usize,
    pub out_channels: usize,
    pub stride: usize,
    /// Groups of the 3×3 (and of a bottleneck's first 1×1).
    pub groups: usize,
    /// Whether a bottleneck's last 1×1 is grouped too (PResNet-50, all but a stage's first block).
    pub group_expand: bool,
}

impl BlockSpec {
    /// A shuffle unit's own spec.
    pub fn shuffle(&self) -> ShuffleSpec {
        ShuffleSpec { in_channels: self.in_channels, out_channels: self.out_channels, stride: self.stride }
    }

    /// Every convolution of the block; a shuffle unit's in [`ShuffleSpec::convs`]'s order.
    pub fn convs(&self) -> Vec<ConvSpec> {
        let s = self;
        let mut v = match s.kind {
            BlockKind::Shuffle => return self.shuffle().convs(),
            BlockKind::Basic => vec![
                ConvSpec::new(s.in_channels, s.out_channels, 3, s.stride).groups(s.groups),
                ConvSpec::new(s.out_channels, s.out_channels, 3, 1).groups(s.groups),
            ],
            BlockKind::Bottleneck => vec![
                ConvSpec::new(s.in_channels, s.width, 1, 1).groups(s.groups),
                ConvSpec::new(s.width, s.width, 3, s.stride).groups(s.groups),
                ConvSpec::new(s.width, s.out_channels, 1, 1).groups(if s.group_expand { s.groups } else { 1 }),
            ],
        };
        if self.has_projection() {
            v.push(ConvSpec::new(s.in_channels, s.out_channels, 1, s.stride));
        }
        v
    }
    /// A 1×1 projection on the shortcut when the shape changes (torchvision's `downsample`).
    pub fn has_projection(&self) -> bool {
        self.kind != BlockKind::Shuffle && (self.stride != 1 || self.in_channels != self.out_channels)
    }

    /// The block's cost on an `h × w` input and its output `[C, H, W]`.
    ///
    /// Saved, as [`Block::forward_link`] runs the block in training: each conv's output; each
    /// batch norm's output but the last, whose batch norm, residual sum and ReLU are one op
    /// writing the block's output (the next block's leaf); the projection's conv and batch norm
    /// outputs; the block's output.
    pub fn cost(&self, h: usize, w: usize) -> (Cost, [usize; 3]) {
        if self.kind == BlockKind::Shuffle {
            return self.shuffle().cost(h, w);
        }
        let mut convs = self.convs();
        let projection = if self.has_projection() { convs.pop() } else { None };
        let mut cost = Cost { output_is_leaf: true, ..Cost::default() };
        let (mut ch, mut cw) = (h, w);
        let last = convs.len() - 1;
        let mut branch_channels = 0;
        let conv_bn = |s: &ConvSpec, oh: usize, ow: usize, cost: &mut Cost| {
            cost.params += s.params() + 2 * s.out_channels as u64;
            cost.buffers += 2 * s.out_channels as u64;
            cost.macs += s.macs(oh, ow);
        };
        for (i, s) in convs.iter().enumerate() {
            (ch, cw) = (s.out_size(ch), s.out_size(cw));
            conv_bn(s, ch, cw, &mut cost);
            cost.saved += (s.out_channels * ch * cw) as u64 * if i != last { CONV_BN_SAVED } else { 1 };
            branch_channels += s.out_channels as u64;
        }
        cost.paper = branch_channels * (ch * cw) as u64;
        if let Some(p) = projection {
            let (ph, pw) = (p.out_size(h), p.out_size(w));
            conv_bn(&p, ph, pw, &mut cost);
            cost.saved += (p.out_channels * ph * pw) as u64 * CONV_BN_SAVED;
        }
        cost.output = (self.out_channels * ch * cw) as u64;
        cost.saved += cost.output;
        (cost, [self.out_channels, ch, cw])
    }
}

/// One block: residual, `relu(branch(x) + shortcut(x))`, or a shuffle unit.
#[derive(Clone, Debug)]
pub struct Block {
    spec: BlockSpec,
    convs: Vec<(Conv2d, BatchNorm2d)>,
    projection: Option<(Conv2d, BatchNorm2d)>,
}

/// Parameters: `{path}.conv{i}.weight`, `{path}.bn{i}.*`, `{path}.downsample.{conv,bn}.*`; a
/// shuffle unit's `{path}.branch2.{conv,bn}{1,2,3}.*` and `{path}.branch1.{conv,bn}{1,2}.*`
/// (torchvision's branch names).
pub fn block(spec: BlockSpec, pb: &ParamBuilder) -> Result<Block> {
    if spec.kind == BlockKind::Shuffle {
        let convs = spec
            .convs()
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let (branch, k) = if i < 3 { ("branch2", i + 1) } else { ("branch1", i - 2) };
                let b = pb.pp(branch);
                Ok((
                    conv2d(*s, &b.pp(format!("conv{k}")))?,
                    batch_norm2d(s.out_channels, false, &b.pp(format!("bn{k}")))?,
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        return Ok(Block { spec, convs, projection: None });
    }
    let mut specs = spec.convs();
    let projection = if spec.has_projection() {
        let p = specs.pop().expect("projection spec present");
        let d = pb.pp("downsample");
        Some((conv2d(p, &d.pp("conv"))?, batch_norm2d(p.out_channels, false, &d.pp("bn"))?))
    } else {
        None
    };
    let convs = specs
        .iter()
        .enumerate()
        .map(|(i, s)| {
            Ok((
                conv2d(*s, &pb.pp(format!("conv{}", i + 1)))?,
                batch_norm2d(s.out_channels, false, &pb.pp(format!("bn{}", i + 1)))?,
            ))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Block { spec, convs, projection })
}

/// A chain of blocks with parameters `{path}.block{i}.…` (stages and decoder conv blocks).
pub fn blocks(specs: Vec<BlockSpec>, pb: &ParamBuilder) -> Result<Vec<Block>> {
    specs.into_iter().enumerate().map(|(i, s)| block(s, &pb.pp(format!("block{i}")))).collect()
}

impl Block {
    pub fn spec(&self) -> &BlockSpec {
        &self.spec
    }
    pub fn convs(&self) -> &[(Conv2d, BatchNorm2d)] {
        &self.convs
    }
    pub fn projection(&self) -> Option<&(Conv2d, BatchNorm2d)> {
        self.projection.as_ref()
    }

    /// # Shapes
    /// `[N, in, H, W]` → `[N, out, H/stride, W/stride]`.
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        if self.spec.kind == BlockKind::Shuffle {
            let (first, second) = halves(&self.spec.shuffle(), &self.convs, x, train)?;
            return super::shuffle::shuffled(&first, &second);
        }
        let (branch, shortcut) = self.forward_parts(x, train)?;
        (branch + shortcut)?.relu()
    }

    /// The block as one [`Link`] reading `x` (the tensor of leaf `input`, when there is one).
    /// In training, on CPU f32/f64, the tail `relu(bn(z) + shortcut)` is one op
    /// ([`Link::tail`]); elsewhere the last batch norm runs on its own and the link sums and
    /// rectifies ([`Link::residual`]).
    pub fn forward_link(&self, input: Option<Var>, x: &Tensor, train: bool) -> Result<Link> {
        if self.spec.kind == BlockKind::Shuffle {
            let (first, second) = halves(&self.spec.shuffle(), &self.convs, x, train)?;
            return Link::interleaved(input, first, second);
        }
        let (z, shortcut) = self.forward_tail_inputs(x, train)?;
        let bn = self.last_bn();
        if train {
            if let Some(op) = bn.fused_train_op(&z)? {
                let (gamma, beta) = bn.affine(z.dtype())?;
                return Link::tail(input, &z, op, &gamma, &beta, shortcut);
            }
        }
        Link::residual(input, bn.forward_t(&z, train)?, shortcut)
    }

    /// `(branch(x), shortcut(x))`, the two terms of the block's output before the sum and the
    /// final ReLU.
    pub fn forward_parts(&self, x: &Tensor, train: bool) -> Result<(Tensor, Tensor)> {
        let (z, shortcut) = self.forward_tail_inputs(x, train)?;
        Ok((self.last_bn().forward_t(&z, train)?, shortcut))
    }

    /// `(z, shortcut(x))` where the branch is `last_bn(z)`: everything but the block's tail
    /// (last batch norm, sum, ReLU), which [`Block::forward_link`] runs as one op.
    pub fn forward_tail_inputs(&self, x: &Tensor, train: bool) -> Result<(Tensor, Tensor)> {
        let mut h = x.clone();
        let last = self.convs.len() - 1;
        for (i, (conv, bn)) in self.convs.iter().enumerate() {
            h = conv.forward(&h)?;
            if i != last {
                h = bn.forward_relu_t(&h, train)?;
            }
        }
        let shortcut = match &self.projection {
            Some((conv, bn)) => bn.forward_t(&conv.forward(x)?, train)?,
            None => x.clone(),
        };
        Ok((h, shortcut))
    }

    /// The batch norm that ends the residual branch.
    pub fn last_bn(&self) -> &BatchNorm2d {
        &self.convs[self.convs.len() - 1].1
    }
}
