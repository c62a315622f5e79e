//! Pooling with correct gradients (minimal version; the ops branch replaces it).

use candle_core::{Result, Tensor};

/// # Shapes
/// `[N, C, H, W]` → `[N, C]`.
pub fn global_avg_pool(x: &Tensor) -> Result<Tensor> {
    x.mean(3)?.mean(2)
}

fn pad_neg(x: &Tensor, dim: usize, before: usize, after: usize) -> Result<Tensor> {
    if before == 0 && after == 0 {
        return Ok(x.clone());
    }
    let mut parts = vec![];
    let mut shape = x.dims().to_vec();
    if before > 0 {
        shape[dim] = before;
        parts.push(Tensor::full(-1e30f32, shape.clone(), x.device())?.to_dtype(x.dtype())?);
    }
    parts.push(x.clone());
    if after > 0 {
        shape[dim] = after;
        parts.push(Tensor::full(-1e30f32, shape.clone(), x.device())?.to_dtype(x.dtype())?);
    }
    Tensor::cat(&parts, dim)
}

/// Every `stride`-th element of `dim`, starting at `start`, `count` of them.
fn strided(x: &Tensor, dim: usize, start: usize, count: usize, stride: usize) -> Result<Tensor> {
    let x = x.narrow(dim, start, count * stride)?;
    let mut shape = x.dims().to_vec();
    shape[dim] = count;
    shape.insert(dim + 1, stride);
    x.reshape(shape)?.narrow(dim + 1, 0, 1)?.squeeze(dim + 1)
}

/// Max pooling built from strided slices and `maximum`, whose gradient is right
/// (candle's own `max_pool2d` backward is scaled by 1/k²).
///
/// # Shapes
/// `[N, C, H, W]` → `[N, C, (H + 2p - k)/s + 1, (W + 2p - k)/s + 1]`.
pub fn max_pool2d(x: &Tensor, kernel: usize, stride: usize, padding: usize) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    let oh = (h + 2 * padding - kernel) / stride + 1;
    let ow = (w + 2 * padding - kernel) / stride + 1;
    let extra_h = ((kernel - 1) + oh * stride).saturating_sub(h + 2 * padding);
    let extra_w = ((kernel - 1) + ow * stride).saturating_sub(w + 2 * padding);
    let xp = pad_neg(&pad_neg(x, 2, padding, padding + extra_h)?, 3, padding, padding + extra_w)?;
    let mut out: Option<Tensor> = None;
    for di in 0..kernel {
        let rows = strided(&xp, 2, di, oh, stride)?;
        for dj in 0..kernel {
            let s = strided(&rows, 3, dj, ow, stride)?;
            out = Some(match out {
                None => s,
                Some(o) => o.maximum(&s)?,
            });
        }
    }
    out.ok_or_else(|| candle_core::Error::Msg("max_pool2d with kernel 0".into()))
}
