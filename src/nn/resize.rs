//! Bilinear resizing (placeholder; the ops branch provides the differentiable version).

use candle_core::{Result, Tensor};

pub fn resize_bilinear(x: &Tensor, oh: usize, ow: usize) -> Result<Tensor> {
    let _ = (x, oh, ow);
    candle_core::bail!("bilinear resize is not available yet")
}
