//! ShuffleNet v2's unit (Ma et al., ECCV 2018, "ShuffleNet V2", Fig. 3(c) and (d)), the block of a
//! `block: shuffle` stage.
//!
//! - **Basic unit** (stride 1, as many channels out as in): the input's channels are split in
//!   half; the first half passes unchanged, the second goes through the branch
//!   1×1 conv → BN → ReLU → 3×3 depthwise conv → BN → 1×1 conv → BN → ReLU.
//! - **Two-branch unit** (stride 2, or other channels out than in): both branches read the
//!   whole input: branch 1 is 3×3 depthwise conv (stride s) → BN → 1×1 conv → BN → ReLU, branch 2
//!   the branch above with the stride on its depthwise conv. Each gives half the output channels.
//!
//! Then the two halves are concatenated and the channels shuffled with two groups, which is one
//! interleave: output channel `2j` is channel `j` of the first half, `2j + 1` channel `j` of the
//! second (torchvision's `channel_shuffle(cat(x1, x2), 2)`: view `[N, 2, C/2, H, W]`, swap the
//! two channel axes, flatten).
//!
//! A two-branch unit with stride 1 is what ShuffleNet v2-50's first stage needs (64 → 244
//! channels at 56×56, no downsampling); torchvision's `InvertedResidual` has no such case. Here
//! its branch 2 starts with a 1×1 conv to half the output channels, as torchvision's does for
//! stride 2.

use candle_core::{DType, Device, Module, Result, Tensor, Var, WithDType};
use rayon::prelude::*;

use super::batch_norm::BatchNorm2d;
use super::conv::{Conv2d, ConvSpec};
use super::cost::CONV_BN_SAVED;
use super::Cost;
use crate::cpu_slice::with_slice;

/// Everything that fixes one unit's shapes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ShuffleSpec {
    pub in_channels: usize,
    pub out_channels: usize,
    pub stride: usize,
}

impl ShuffleSpec {
    /// A basic unit: it splits its input instead of reading all of it twice.
    pub fn splits(&self) -> bool {
        self.stride == 1 && self.in_channels == self.out_channels
    }

    /// Channels of each half (and of every conv of branch 2).
    pub fn branch_channels(&self) -> usize {
        self.out_channels / 2
    }

    /// Branch 2's convolutions, then branch 1's (none in a basic unit).
    pub fn convs(&self) -> Vec<ConvSpec> {
        let (c, b, s) = (self.in_channels, self.branch_channels(), self.stride);
        let first_in = if self.splits() { b } else { c };
        let mut v =
            vec![ConvSpec::new(first_in, b, 1, 1), ConvSpec::new(b, b, 3, s).groups(b), ConvSpec::new(b, b, 1, 1)];
        if !self.splits() {
            v.push(ConvSpec::new(c, c, 3, s).groups(c));
            v.push(ConvSpec::new(c, b, 1, 1));
        }
        v
    }

    /// What cannot be built, if anything.
    pub fn check(&self) -> std::result::Result<(), String> {
        if self.out_channels == 0 || !self.out_channels.is_multiple_of(2) {
            return Err(format!("a shuffle unit needs an even number of output channels, got {}", self.out_channels));
        }
        if self.stride == 1 && self.in_channels == self.out_channels && !self.in_channels.is_multiple_of(2) {
            return Err(format!("a basic shuffle unit splits its {} input channels in half", self.in_channels));
        }
        Ok(())
    }

    /// The unit's cost on an `h × w` input and its output `[C, H, W]`.
    ///
    /// Saved in training, per conv: its output and its batch norm's (ReLU fused in where there
    /// is one); then the unit's output, written by [`interleave`] into the next unit's leaf.
    /// The halves are views or the batch norms' outputs: nothing else is stored. The
    /// paper-style memory counts every conv's output channels at the unit's output size.
    pub fn cost(&self, h: usize, w: usize) -> (Cost, [usize; 3]) {
        let mut cost = Cost { output_is_leaf: true, ..Cost::default() };
        let (oh, ow) =
            (ConvSpec::new(1, 1, 3, self.stride).out_size(h), ConvSpec::new(1, 1, 3, self.stride).out_size(w));
        for (i, s) in self.convs().iter().enumerate() {
            // Branch 2's first 1×1 runs at the input's size, everything after a stride at the output's.
            let (ch, cw) = if i == 0 { (h, w) } else { (oh, ow) };
            cost.params += s.params() + 2 * s.out_channels as u64;
            cost.buffers += 2 * s.out_channels as u64;
            cost.macs += s.macs(ch, cw);
            cost.saved += (s.out_channels * ch * cw) as u64 * CONV_BN_SAVED;
            cost.paper += (s.out_channels * oh * ow) as u64;
        }
        cost.output = (self.out_channels * oh * ow) as u64;
        cost.saved += cost.output;
        (cost, [self.out_channels, oh, ow])
    }
}

/// The two halves of a unit's output before the shuffle, from its convs and batch norms in
/// [`ShuffleSpec::convs`]'s order.
///
/// # Shapes
/// `[N, in, H, W]` → two of `[N, out/2, H/stride, W/stride]`.
pub fn halves(
    spec: &ShuffleSpec,
    layers: &[(Conv2d, BatchNorm2d)],
    x: &Tensor,
    train: bool,
) -> Result<(Tensor, Tensor)> {
    let [c1, d2, c3, rest @ ..] = layers else { candle_core::bail!("a shuffle unit has {} convs", layers.len()) };
    let b = spec.branch_channels();
    let (first, second) = if spec.splits() { (x.narrow(1, 0, b)?, x.narrow(1, b, b)?) } else { (x.clone(), x.clone()) };
    let mut r = c1.1.forward_relu_t(&c1.0.forward(&second)?, train)?;
    r = d2.1.forward_t(&d2.0.forward(&r)?, train)?;
    r = c3.1.forward_relu_t(&c3.0.forward(&r)?, train)?;
    let l = match rest {
        [] => first,
        [d1, c2] => {
            let l = d1.1.forward_t(&d1.0.forward(&first)?, train)?;
            c2.1.forward_relu_t(&c2.0.forward(&l)?, train)?
        }
        _ => candle_core::bail!("a shuffle unit has {} convs", layers.len()),
    };
    Ok((l, r))
}

/// Concatenation and channel shuffle in one pass: channel `2j` of the result is channel `j` of
/// `a`, `2j + 1` channel `j` of `b`. On CPU (f32/f64) it writes straight into a new leaf.
///
/// # Shapes
/// two of `[N, C, H, W]` → `[N, 2C, H, W]`.
pub fn interleave(a: &Tensor, b: &Tensor) -> Result<Var> {
    fn typed<T: WithDType + Send + Sync>(a: &Tensor, b: &Tensor, hw: usize) -> Result<Vec<T>> {
        with_slice(a, |a: &[T]| {
            with_slice(b, |b: &[T]| {
                let mut out = vec![T::zero(); 2 * a.len()];
                out.par_chunks_mut(2 * hw).enumerate().for_each(|(plane, dst)| {
                    let src = plane * hw..(plane + 1) * hw;
                    dst[..hw].copy_from_slice(&a[src.clone()]);
                    dst[hw..].copy_from_slice(&b[src]);
                });
                out
            })
        })?
    }
    let (n, c, h, w) = a.dims4()?;
    if a.shape() != b.shape() || a.dtype() != b.dtype() {
        candle_core::bail!("channel shuffle of {:?} {:?} and {:?} {:?}", a.shape(), a.dtype(), b.shape(), b.dtype());
    }
    let shape = (n, 2 * c, h, w);
    match (a.device(), a.dtype()) {
        (Device::Cpu, DType::F32) => Var::from_vec(typed::<f32>(a, b, h * w)?, shape, a.device()),
        (Device::Cpu, DType::F64) => Var::from_vec(typed::<f64>(a, b, h * w)?, shape, a.device()),
        _ => Var::from_tensor(&shuffled(&a.detach(), &b.detach())?),
    }
}

/// [`interleave`] as candle ops (differentiable; any device): stack on a new axis after the
/// channels, flatten it into them.
pub fn shuffled(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let (n, c, h, w) = a.dims4()?;
    Tensor::stack(&[a, b], 2)?.reshape((n, 2 * c, h, w))
}

/// The inverse of [`interleave`] on a cotangent: the even channels and the odd ones.
///
/// # Shapes
/// `[N, 2C, H, W]` → two of `[N, C, H, W]`.
pub fn deinterleave(g: &Tensor) -> Result<(Tensor, Tensor)> {
    let (n, c2, h, w) = g.dims4()?;
    let g = g.reshape((n, c2 / 2, 2, h * w))?;
    let half = |k| -> Result<Tensor> { g.narrow(2, k, 1)?.contiguous()?.reshape((n, c2 / 2, h, w)) };
    Ok((half(0)?, half(1)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interleave_is_torchvisions_cat_then_channel_shuffle() -> Result<()> {
        // torchvision: x = cat((a, b), 1); x.view(n, 2, c, h, w).transpose(1, 2).reshape(n, 2c, h, w)
        let dev = Device::Cpu;
        let a = Tensor::arange(0f32, 24., &dev)?.reshape((2, 3, 2, 2))?;
        let b = (Tensor::arange(0f32, 24., &dev)?.reshape((2, 3, 2, 2))? + 100.)?;
        let cat = Tensor::cat(&[&a, &b], 1)?;
        let want = cat.reshape((2, 2, 3, 2, 2))?.transpose(1, 2)?.contiguous()?.reshape((2, 6, 2, 2))?;
        let got = interleave(&a, &b)?;
        assert_eq!(got.as_tensor().flatten_all()?.to_vec1::<f32>()?, want.flatten_all()?.to_vec1::<f32>()?);
        assert_eq!(shuffled(&a, &b)?.flatten_all()?.to_vec1::<f32>()?, want.flatten_all()?.to_vec1::<f32>()?);
        let (x, y) = deinterleave(got.as_tensor())?;
        assert_eq!(x.flatten_all()?.to_vec1::<f32>()?, a.flatten_all()?.to_vec1::<f32>()?);
        assert_eq!(y.flatten_all()?.to_vec1::<f32>()?, b.flatten_all()?.to_vec1::<f32>()?);
        // A strided half (a basic unit's first half is a view of its input) reads the same.
        let wide = Tensor::cat(&[&a, &b], 1)?;
        let got = interleave(&wide.narrow(1, 0, 3)?, &wide.narrow(1, 3, 3)?)?;
        assert_eq!(got.as_tensor().flatten_all()?.to_vec1::<f32>()?, want.flatten_all()?.to_vec1::<f32>()?);
        Ok(())
    }
}
