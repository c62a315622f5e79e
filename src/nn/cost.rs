//! What a layer costs, computed from its spec alone (nothing is allocated): parameters,
//! multiply-accumulates, and the activation elements its training forward keeps for the
//! backward. Every layer spec computes its own (`BlockSpec::cost`, `StemConfig::cost`, …);
//! `graph::Plan` holds one per node, and the memory guard, `locograph profile`, placement and
//! the memory benchmark all read those.
//!
//! Activation counts are per image and describe what this crate's layers keep, as they are
//! built here (fused batch norm + ReLU, block tails written into the next block's leaf, the
//! stem's fused pool): change a layer's forward, change its `cost`. `tests/memory.rs` checks
//! the predictions they add up to against a counting allocator.

use std::ops::{Add, AddAssign};

/// Tensors of a conv's output size kept for the backward of conv + training-mode batch norm
/// (`nn::batch_norm_op`): the conv output (the batch norm's input) and the batch norm's output
/// (the next conv's input, ReLU fused in).
pub(crate) const CONV_BN_SAVED: u64 = 2;

/// A layer's cost per image.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Cost {
    /// Trained parameters: conv and linear weights, biases, batch-norm scale and shift.
    pub params: u64,
    /// State that is saved but not trained: batch-norm running statistics.
    pub buffers: u64,
    /// Multiply-accumulates of the convolutions and linear layers (one MAC = one FLOP, the
    /// convention behind ResNet-50's "4.1 GFLOPs"). Batch norm, ReLU, pooling and resizing are
    /// left out, as in the paper.
    pub macs: u64,
    /// Elements of every tensor kept for the backward while the layer's graph is alive, its
    /// output included. Not counted: per-channel statistics, the layer's input (its producer
    /// or the engine owns it).
    pub saved: u64,
    /// Elements of the output.
    pub output: u64,
    /// Paper-style activation memory (the LoCo supplementary's table): the channels of every
    /// convolution on a residual branch (a bottleneck's `w + w + C`, a basic block's `C + C`; not
    /// the projection shortcut) at the block's output size.
    pub paper: u64,
    /// Elements per (views in the batch)²: a contrastive loss's similarity matrices, which grow
    /// with the square of the batch instead of with each image.
    pub pairwise: u64,
    /// The training forward ends in a residual link, whose output is a leaf already: a consumer
    /// that needs its gradient reads it without a copy.
    pub output_is_leaf: bool,
}

impl Cost {
    /// Bytes kept for the backward by `views` images at `elem_bytes` per element (saturating:
    /// an absurd batch must be reported, not overflow).
    pub fn saved_bytes(&self, views: usize, elem_bytes: usize) -> usize {
        let per_image = bytes(self.saved, views, elem_bytes);
        per_image.saturating_add(bytes(self.pairwise, views.saturating_mul(views), elem_bytes))
    }
    /// Bytes of the output of `views` images (a loss's scalar when the output is empty).
    pub fn output_bytes(&self, views: usize, elem_bytes: usize) -> usize {
        if self.output == 0 {
            elem_bytes
        } else {
            bytes(self.output, views, elem_bytes)
        }
    }
}

fn bytes(elems: u64, count: usize, elem_bytes: usize) -> usize {
    usize::try_from(elems).unwrap_or(usize::MAX).saturating_mul(count).saturating_mul(elem_bytes)
}

impl Add for Cost {
    type Output = Cost;
    /// The cost of two layers run one after the other (the second's output is the result's).
    fn add(self, b: Cost) -> Cost {
        Cost {
            params: self.params + b.params,
            buffers: self.buffers + b.buffers,
            macs: self.macs + b.macs,
            saved: self.saved + b.saved,
            output: b.output,
            paper: self.paper + b.paper,
            pairwise: self.pairwise + b.pairwise,
            output_is_leaf: b.output_is_leaf,
        }
    }
}

impl AddAssign for Cost {
    fn add_assign(&mut self, b: Cost) {
        *self = *self + b;
    }
}
