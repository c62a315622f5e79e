//! 2-D convolution with seeded Kaiming initialisation.

use candle_core::{Module, Result, Tensor};

use super::{Init, ParamBuilder, ParamKind};

/// Hyper-parameters of a convolution.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvSpec {
    pub in_channels: usize,
    pub out_channels: usize,
    pub kernel: usize,
    pub stride: usize,
    pub padding: usize,
    pub groups: usize,
}

impl ConvSpec {
    /// A `k×k` convolution with "same" padding for odd `k`.
    pub fn new(in_channels: usize, out_channels: usize, kernel: usize, stride: usize) -> Self {
        Self { in_channels, out_channels, kernel, stride, padding: kernel / 2, groups: 1 }
    }
    pub fn groups(mut self, groups: usize) -> Self {
        self.groups = groups;
        self
    }
    /// Output side for an input side, as PyTorch computes it.
    pub fn out_size(&self, size: usize) -> usize {
        (size + 2 * self.padding - self.kernel) / self.stride + 1
    }
    /// Weights of the kernel (`[out, in/groups, k, k]`; bias-free).
    pub fn params(&self) -> u64 {
        (self.out_channels * (self.in_channels / self.groups) * self.kernel * self.kernel) as u64
    }
    /// Multiply-accumulates per image for an output of `oh×ow`.
    pub fn macs(&self, oh: usize, ow: usize) -> u64 {
        (self.out_channels * oh * ow * (self.in_channels / self.groups) * self.kernel * self.kernel) as u64
    }
}

/// A bias-free convolution (every convolution in a ResNet is followed by BatchNorm).
#[derive(Clone, Debug)]
pub struct Conv2d {
    weight: Tensor,
    spec: ConvSpec,
}

/// Creates `{path}.weight` of shape `[out, in/groups, k, k]`, Kaiming-normal (fan-out), as
/// torchvision initialises ResNets.
pub fn conv2d(spec: ConvSpec, pb: &ParamBuilder) -> Result<Conv2d> {
    if spec.groups == 0
        || !spec.in_channels.is_multiple_of(spec.groups)
        || !spec.out_channels.is_multiple_of(spec.groups)
    {
        candle_core::bail!(
            "conv {}: groups {} must divide in_channels {} and out_channels {}",
            pb.name("weight"),
            spec.groups,
            spec.in_channels,
            spec.out_channels
        );
    }
    let fan_out = spec.out_channels * spec.kernel * spec.kernel / spec.groups;
    let shape = (spec.out_channels, spec.in_channels / spec.groups, spec.kernel, spec.kernel);
    let weight = pb.param("weight", shape, ParamKind::Weight, Init::kaiming_fan_out(fan_out))?;
    Ok(Conv2d { weight, spec })
}

impl Conv2d {
    pub fn spec(&self) -> &ConvSpec {
        &self.spec
    }
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }
}

impl Module for Conv2d {
    /// # Shapes
    /// `[N, in, H, W]` → `[N, out, H', W']` with `H' = (H + 2p - k)/s + 1`.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let s = &self.spec;
        // candle's own backward is a naive conv_transpose2d loop (see conv_op). Mixed precision:
        // the f32 weight is cast to the activations' type (a no-op in f32).
        super::conv_op::conv2d(x, &self.weight.to_dtype(x.dtype())?, s.padding, s.stride, s.groups)
    }
}
