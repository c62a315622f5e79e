//! Max pooling with PyTorch's semantics and a correct gradient, and global average pooling.
//!
//! candle's `max_pool2d` has a gradient scaled by 1/k², no gradient when kernel ≠ stride, and no
//! padding (candle-notes traps 1–2). Here the pool is split in two:
//! 1. find, without gradient, the flat position of each window's maximum (the argmax);
//! 2. `gather` the input at those positions.
//!
//! The output is exactly the input's values, and candle's gradient of `gather` is a single
//! `scatter_add` of the output gradient into the input: one pass over the output, with no
//! padded copies and no k² full-size masks in the backward graph. Overlapping windows
//! (stride < kernel) that share a maximum each add their gradient to it, as in PyTorch.

use candle_core::{DType, Device, Result, Storage, Tensor, WithDType};
use rayon::prelude::*;

/// The geometry of one pooling call, validated.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Pool {
    pub(crate) n: usize,
    pub(crate) c: usize,
    pub(crate) h: usize,
    pub(crate) w: usize,
    k: usize,
    s: usize,
    p: usize,
    pub(crate) oh: usize,
    pub(crate) ow: usize,
}

impl Pool {
    pub(crate) fn new(x: &Tensor, k: usize, s: usize, p: usize) -> Result<Self> {
        let (n, c, h, w) = x.dims4()?;
        if k == 0 || s == 0 {
            candle_core::bail!("max_pool2d: kernel {k} and stride {s} must be positive")
        }
        // PyTorch's rule; it also guarantees every window holds at least one real element.
        if p > k / 2 {
            candle_core::bail!("max_pool2d: padding {p} must be at most half of kernel {k}")
        }
        if h + 2 * p < k || w + 2 * p < k {
            candle_core::bail!(
                "max_pool2d: kernel {k} larger than the padded input {}x{} (input {:?}, padding {p})",
                h + 2 * p,
                w + 2 * p,
                x.dims()
            )
        }
        let oh = (h + 2 * p - k) / s + 1;
        let ow = (w + 2 * p - k) / s + 1;
        Ok(Self { n, c, h, w, k, s, p, oh, ow })
    }

    /// First row (or column) of output window `o` in input coordinates; negative in the padding.
    fn start(&self, o: usize) -> isize {
        (o * self.s) as isize - self.p as isize
    }

    /// The rows (or columns) `[a, b)` of output window `o` inside an input side of `size`:
    /// the window clipped to the input, so the padding is never read.
    pub(crate) fn window(&self, o: usize, size: usize) -> (usize, usize) {
        let a = self.start(o);
        (a.max(0) as usize, ((a + self.k as isize) as usize).min(size))
    }
}

/// 2-D max pooling over NCHW, like PyTorch's `F.max_pool2d(x, kernel, stride, padding)`.
///
/// Output size is `floor((H + 2·padding − kernel) / stride) + 1` (PyTorch's `ceil_mode=False`,
/// `dilation=1`); padding counts as −∞. `padding ≤ kernel / 2`, as in PyTorch.
///
/// Gradient: each output's gradient goes entirely to its window's maximum. On ties it goes to
/// the *first* maximum in row-major window order (PyTorch's CPU kernel does the same), not split
/// among them and not copied to each: this matters after a ReLU, where all-zero windows are
/// common and candle's ReLU passes gradient at exactly 0 (candle-notes trap 8). A NaN in a
/// window is its maximum (the last NaN, as in PyTorch), so NaNs propagate.
///
/// On the CPU the argmax is one parallel pass over the input in plain Rust; on other devices it
/// is built from tensor ops (6× slower on the CPU). The 3×3/2 ImageNet stem pool at
/// 16×64×112×112 took 88 ms forward and 230 ms forward + backward on 2 busy cores in the dev
/// profile (`bench_stem_pool`), less than candle's own 2×2 `max_pool2d` (280 ms).
///
/// # Shapes
/// - `x`: `[N, C, H, W]`
/// - returns `[N, C, floor((H + 2p − k)/s) + 1, floor((W + 2p − k)/s) + 1]`
pub fn max_pool2d(x: &Tensor, kernel: usize, stride: usize, padding: usize) -> Result<Tensor> {
    let g = Pool::new(x, kernel, stride, padding)?;
    let positions = match x.device() {
        Device::Cpu => argmax_cpu(x, &g)?,
        _ => argmax_tensor_ops(x, &g)?,
    };
    x.reshape((g.n * g.c, g.h * g.w))?.gather(&positions, 1)?.reshape((g.n, g.c, g.oh, g.ow))
}

/// Global average pooling: the mean over H and W; on the CPU one op that reads the input in
/// its memory order and writes the gradient in it ([`super::avg_pool_op`]).
///
/// # Shapes
/// - `x`: `[N, C, H, W]`
/// - returns `[N, C]`
pub fn global_avg_pool(x: &Tensor) -> Result<Tensor> {
    x.dims4()?;
    match (x.device(), x.dtype()) {
        (Device::Cpu, DType::F32 | DType::F64 | DType::BF16) => x.apply_op1(super::avg_pool_op::GlobalAvgPool),
        _ => x.mean((2, 3)),
    }
}

/// In-plane flat position (`y·W + x`) of each window's maximum, computed on the CPU.
///
/// # Shapes
/// - returns `[N·C, OH·OW]`, u32
fn argmax_cpu(x: &Tensor, g: &Pool) -> Result<Tensor> {
    let x = x.contiguous()?;
    let (storage, layout) = x.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else {
        candle_core::bail!("max_pool2d: argmax_cpu called on a {:?} tensor", x.device())
    };
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("max_pool2d: input not contiguous after contiguous()")
    };
    let positions = match x.dtype() {
        DType::F32 => argmax_planes(&cpu.as_slice::<f32>()?[start..end], g),
        DType::F64 => argmax_planes(&cpu.as_slice::<f64>()?[start..end], g),
        // Half types would need the `half` crate as a direct dependency; they are rare on a CPU.
        _ => {
            drop(storage);
            return argmax_tensor_ops(&x, g);
        }
    };
    Tensor::from_vec(positions, (g.n * g.c, g.oh * g.ow), &Device::Cpu)
}

/// In-plane flat position of each window's maximum, for a contiguous `[N, C, H, W]` slice.
pub(crate) fn argmax_planes<T: WithDType>(data: &[T], g: &Pool) -> Vec<u32> {
    let mut out = vec![0u32; g.n * g.c * g.oh * g.ow];
    let rows: Vec<_> = (0..g.oh).map(|o| g.window(o, g.h)).collect();
    let cols: Vec<_> = (0..g.ow).map(|o| g.window(o, g.w)).collect();
    out.par_chunks_mut(g.oh * g.ow).zip(data.par_chunks(g.h * g.w)).for_each(|(out, plane)| {
        for (oy, &(y0, y1)) in rows.iter().enumerate() {
            for (ox, &(x0, x1)) in cols.iter().enumerate() {
                // PyTorch's loop: start at the first real element, take strictly greater
                // values (first maximum wins ties) or NaN.
                let mut best_at = y0 * g.w + x0;
                let mut best = plane[best_at];
                for y in y0..y1 {
                    for (i, &v) in plane[y * g.w + x0..y * g.w + x1].iter().enumerate() {
                        if v > best || v.partial_cmp(&v).is_none() {
                            best = v;
                            best_at = y * g.w + x0 + i;
                        }
                    }
                }
                out[oy * g.ow + ox] = best_at as u32;
            }
        }
    });
    out
}

/// The same positions as [`argmax_cpu`], from tensor ops (for devices without a Rust loop).
///
/// Pads with −∞, splits rows and columns into `stride` phases by a reshape so that each of
/// the k² window offsets is a plain narrow, and keeps a running (max, position) pair.
///
/// # Shapes
/// - returns `[N·C, OH·OW]`, i64
fn argmax_tensor_ops(x: &Tensor, g: &Pool) -> Result<Tensor> {
    let (nc, k, s, p) = (g.n * g.c, g.k, g.s, g.p);
    let dev = x.device();
    // Rows touched by windows, rounded up to whole stride blocks: B·s with B = O + (k−1)/s.
    let (bh, bw) = (g.oh + (k - 1) / s, g.ow + (k - 1) / s);
    let pad = |t: Tensor, dim: usize, size: usize, total: usize| -> Result<Tensor> {
        // Drop rows no window reaches, then pad top/left by p and bottom/right up to `total`.
        let keep = size.min(total - p);
        let t = t.narrow(dim, 0, keep)?;
        let mut shape = t.dims().to_vec();
        let mut parts = vec![];
        if p > 0 {
            shape[dim] = p;
            parts.push(Tensor::full(f64::NEG_INFINITY, shape.as_slice(), dev)?.to_dtype(t.dtype())?);
        }
        parts.push(t.clone());
        if total > p + keep {
            shape[dim] = total - p - keep;
            parts.push(Tensor::full(f64::NEG_INFINITY, shape.as_slice(), dev)?.to_dtype(t.dtype())?);
        }
        Tensor::cat(&parts, dim)
    };
    let xd = x.detach().reshape((nc, g.h, g.w))?;
    let xp = pad(pad(xd, 1, g.h, bh * s)?, 2, g.w, bw * s)?.reshape((nc, bh, s, bw, s))?;

    // Position tables [OH, OW] for each window offset; 0 where the offset lies in the padding
    // (−∞ there is never strictly greater, so those entries are never taken).
    let table = |di: usize, dj: usize| -> Result<Tensor> {
        let mut t = vec![0i64; g.oh * g.ow];
        for oy in 0..g.oh {
            for ox in 0..g.ow {
                let (y, xx) = (g.start(oy) + di as isize, g.start(ox) + dj as isize);
                if (0..g.h as isize).contains(&y) && (0..g.w as isize).contains(&xx) {
                    t[oy * g.ow + ox] = y as i64 * g.w as i64 + xx as i64;
                }
            }
        }
        Tensor::from_vec(t, (1, g.oh, g.ow), dev)?.broadcast_as((nc, g.oh, g.ow))?.contiguous()
    };
    let mut best = Tensor::full(f64::NEG_INFINITY, (nc, g.oh, g.ow), dev)?.to_dtype(x.dtype())?;
    // Starts at each window's first real element, as PyTorch's loop does.
    let mut arg = {
        let mut t = vec![0i64; g.oh * g.ow];
        for oy in 0..g.oh {
            for ox in 0..g.ow {
                let (y, xx) = (g.start(oy).max(0), g.start(ox).max(0));
                t[oy * g.ow + ox] = y as i64 * g.w as i64 + xx as i64;
            }
        }
        Tensor::from_vec(t, (1, g.oh, g.ow), dev)?.broadcast_as((nc, g.oh, g.ow))?.contiguous()?
    };
    for di in 0..k {
        for dj in 0..k {
            let v = xp
                .narrow(1, di / s, g.oh)?
                .narrow(2, di % s, 1)?
                .narrow(3, dj / s, g.ow)?
                .narrow(4, dj % s, 1)?
                .reshape((nc, g.oh, g.ow))?;
            // Strictly greater (first maximum wins), or NaN (NaN propagates).
            let take = (v.gt(&best)? + v.ne(&v)?)?;
            best = take.where_cond(&v, &best)?;
            arg = take.where_cond(&table(di, dj)?, &arg)?;
        }
    }
    arg.reshape((nc, g.oh * g.ow))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::gradcheck::gradcheck;
    use candle_core::Var;

    struct Case {
        k: usize,
        s: usize,
        p: usize,
        ties: usize,
        out_hw: (usize, usize),
        out: &'static [u8],
        grad: &'static [u8],
    }

    // Integer inputs keep every value exact in f32. Reference (PyTorch 2.15, CPU):
    // ```python
    // import torch, torch.nn.functional as F
    // x = ((torch.arange(2 * 7 * 9) * 37) % 61).double().reshape(1, 2, 7, 9)
    // # ties: 1 = after a ReLU (some all-zero windows), 2 = all zeros (every window a tie)
    // for k, s, p, ties in [(2, 2, 0, 0), (3, 2, 1, 0), (3, 1, 1, 0), (3, 2, 0, 0), (3, 2, 1, 1), (3, 2, 1, 2)]:
    //     xi = [x, (x - 40).clamp(min=0), x * 0][ties].clone()
    //     xi.requires_grad_()
    //     y = F.max_pool2d(xi, k, s, p)
    //     (y * (torch.arange(y.numel()) % 5 + 1).reshape(y.shape)).sum().backward()
    //     print((k, s, p, ties), list(y.shape), y.int().flatten().tolist(), xi.grad.int().flatten().tolist())
    // ```
    #[rustfmt::skip]
    const CASES: &[Case] = &[
    Case { k: 2, s: 2, p: 0, ties: 0, out_hw: (3, 4),
        out: &[37, 50, 54, 43, 60, 45, 58, 38, 55, 40, 53, 57, 50, 54, 43, 56, 45, 58, 38, 51, 40, 53, 57, 46],
        grad: &[0, 1, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 3, 0, 0, 4, 0, 0, 0, 0, 1, 0, 2, 0, 0, 0, 0, 5, 0, 0, 0, 0, 0, 3, 0, 0, 0, 0, 5, 0, 1, 0, 0, 0, 0, 4, 0, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 4, 0, 0, 5, 0, 1, 0, 0, 2, 0, 3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 4, 0, 5, 0, 0, 1, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 3, 0, 0, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0] },
    Case { k: 3, s: 2, p: 1, ties: 0, out_hw: (4, 5),
        out: &[37, 50, 54, 43, 52, 60, 60, 58, 58, 47, 60, 60, 53, 57, 42, 55, 59, 48, 57, 37, 50, 54, 43, 56, 56, 45, 58, 58, 56, 60, 40, 53, 57, 51, 55, 59, 48, 57, 46, 50],
        grad: &[0, 1, 0, 2, 0, 0, 0, 0, 5, 0, 0, 0, 0, 3, 0, 0, 4, 0, 0, 0, 0, 0, 0, 7, 0, 0, 5, 0, 6, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 3, 0, 0, 5, 0, 1, 0, 0, 0, 0, 8, 0, 0, 0, 0, 2, 0, 0, 3, 0, 0, 5, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0, 3, 0, 13, 0, 0, 1, 0, 5, 0, 0, 0, 0, 5, 0, 0, 0, 0, 0, 0, 0, 4, 0, 0, 1, 0, 2, 0, 0, 0, 0, 5, 0, 0, 0, 0, 6, 0, 0, 4, 0, 1, 0, 0, 2, 0, 0, 0, 0, 5] },
    Case { k: 3, s: 1, p: 1, ties: 0, out_hw: (7, 9),
        out: &[37, 41, 50, 54, 54, 54, 43, 52, 52, 56, 56, 50, 54, 58, 58, 58, 52, 52, 60, 60, 60, 54, 58, 58, 58, 47, 47, 60, 60, 60, 49, 58, 58, 58, 47, 47, 60, 60, 60, 49, 53, 57, 57, 57, 42, 55, 59, 59, 59, 53, 57, 57, 57, 42, 55, 59, 59, 59, 48, 57, 57, 57, 37, 50, 54, 54, 54, 43, 52, 56, 56, 56, 50, 54, 58, 58, 58, 52, 56, 60, 60, 45, 54, 58, 58, 58, 47, 56, 60, 60, 45, 49, 58, 58, 58, 47, 51, 60, 60, 40, 49, 53, 57, 57, 57, 51, 55, 55, 59, 59, 53, 57, 57, 57, 46, 55, 55, 59, 59, 48, 57, 57, 57, 46, 50, 50],
        grad: &[0, 1, 0, 5, 0, 0, 0, 0, 12, 0, 0, 2, 0, 15, 0, 0, 2, 0, 6, 0, 0, 0, 0, 31, 0, 0, 9, 0, 31, 0, 0, 6, 0, 0, 0, 0, 0, 0, 0, 0, 0, 6, 0, 0, 9, 0, 6, 0, 0, 0, 0, 23, 0, 0, 0, 0, 15, 0, 0, 4, 0, 0, 3, 0, 7, 0, 0, 0, 0, 7, 0, 0, 0, 0, 15, 0, 0, 3, 0, 15, 0, 0, 3, 0, 30, 0, 0, 3, 0, 22, 0, 0, 3, 0, 0, 0, 0, 3, 0, 0, 5, 0, 3, 0, 0, 0, 0, 8, 0, 0, 0, 0, 27, 0, 0, 9, 0, 16, 0, 0, 5, 0, 0, 0, 0, 6] },
    Case { k: 3, s: 2, p: 0, ties: 0, out_hw: (3, 4),
        out: &[56, 54, 58, 52, 60, 49, 58, 47, 59, 59, 57, 57, 54, 58, 52, 60, 49, 58, 47, 60, 59, 57, 57, 55],
        grad: &[0, 0, 0, 0, 0, 0, 0, 0, 4, 0, 0, 0, 0, 2, 0, 0, 0, 0, 1, 0, 0, 0, 0, 5, 0, 0, 3, 0, 5, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 3, 0, 0, 0, 0, 9, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 5, 0, 0, 0, 0, 3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 7, 0, 0, 4, 0, 6, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 4, 0, 0, 0, 0, 5, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0] },
    Case { k: 3, s: 2, p: 1, ties: 1, out_hw: (4, 5),
        out: &[0, 10, 14, 3, 12, 20, 20, 18, 18, 7, 20, 20, 13, 17, 2, 15, 19, 8, 17, 0, 10, 14, 3, 16, 16, 5, 18, 18, 16, 20, 0, 13, 17, 11, 15, 19, 8, 17, 6, 10],
        grad: &[1, 0, 0, 2, 0, 0, 0, 0, 5, 0, 0, 0, 0, 3, 0, 0, 4, 0, 0, 0, 0, 0, 0, 7, 0, 0, 5, 0, 6, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 3, 0, 0, 5, 0, 1, 0, 0, 0, 0, 8, 5, 0, 0, 0, 2, 0, 0, 3, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0, 3, 0, 13, 0, 0, 1, 0, 5, 0, 0, 0, 0, 5, 1, 0, 0, 0, 0, 0, 0, 4, 0, 0, 0, 0, 2, 0, 0, 0, 0, 5, 0, 0, 0, 0, 6, 0, 0, 4, 0, 1, 0, 0, 2, 0, 0, 0, 0, 5] },
    Case { k: 3, s: 2, p: 1, ties: 2, out_hw: (4, 5),
        out: &[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        grad: &[1, 2, 0, 3, 0, 4, 0, 5, 0, 1, 2, 0, 3, 0, 4, 0, 5, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 2, 0, 3, 0, 4, 0, 5, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 2, 0, 3, 0, 4, 0, 5, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 2, 0, 3, 0, 4, 0, 5, 0, 1, 2, 0, 3, 0, 4, 0, 5, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 2, 0, 3, 0, 4, 0, 5, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 2, 0, 3, 0, 4, 0, 5, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0] },
    ];

    fn pool_input(ties: usize, dtype: DType) -> Result<Tensor> {
        let v: Vec<f64> = (0..2 * 7 * 9).map(|i| ((i * 37) % 61) as f64).collect();
        let x = Tensor::from_vec(v, (1, 2, 7, 9), &Device::Cpu)?;
        let x = match ties {
            0 => x,
            1 => (x - 40.0)?.relu()?,
            _ => x.zeros_like()?,
        };
        x.to_dtype(dtype)
    }

    fn as_f64(v: &[u8]) -> Vec<f64> {
        v.iter().map(|&u| u as f64).collect()
    }

    #[test]
    fn matches_pytorch_values_and_gradients() -> Result<()> {
        for dtype in [DType::F32, DType::F64] {
            for case in CASES {
                let x = Var::from_tensor(&pool_input(case.ties, dtype)?)?;
                let y = max_pool2d(&x, case.k, case.s, case.p)?;
                assert_eq!(y.dims(), &[1, 2, case.out_hw.0, case.out_hw.1]);
                let out = y.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?;
                assert_eq!(out, as_f64(case.out), "k={} s={} p={}", case.k, case.s, case.p);
                let w: Vec<f64> = (0..y.elem_count()).map(|j| (j % 5 + 1) as f64).collect();
                let w = Tensor::from_vec(w, y.shape(), &Device::Cpu)?.to_dtype(dtype)?;
                let grads = y.mul(&w)?.sum_all()?.backward()?;
                let Some(g) = grads.get(&x) else { panic!("no gradient reached the input") };
                let g = g.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?;
                assert_eq!(g, as_f64(case.grad), "k={} s={} p={} ties={}", case.k, case.s, case.p, case.ties);
            }
        }
        Ok(())
    }

    /// A permutation of 0.01·k: distinct values 0.01 apart, far beyond the 1e-4 step.
    fn spaced(shape: (usize, usize, usize, usize)) -> Result<Tensor> {
        let len = shape.0 * shape.1 * shape.2 * shape.3;
        let v: Vec<f64> = (0..len).map(|i| ((i * 7919) % len) as f64 * 0.01 - 1.0).collect();
        Tensor::from_vec(v, shape, &Device::Cpu)
    }

    #[test]
    fn gradcheck_f64() -> Result<()> {
        let x = spaced((2, 3, 9, 7))?;
        for (k, s, p) in [(2, 2, 0), (3, 2, 1), (3, 1, 1), (3, 2, 0)] {
            let r = gradcheck(|x| max_pool2d(x, k, s, p), &x, 1e-4, 7)?;
            println!("max_pool2d k={k} s={s} p={p} on 9x7: {r}");
            assert!(r.max_rel_err <= 1e-6, "k={k} s={s} p={p}: {r}");
        }
        Ok(())
    }

    /// The CPU loop and the tensor-op path (used on other devices) pick the same positions,
    /// ties and NaN included.
    #[test]
    fn cpu_and_tensor_op_argmax_agree() -> Result<()> {
        // Rounded to 0.1 and ReLU'd: many ties and all-zero windows.
        let x = ((spaced((2, 3, 11, 8))? * 3.0)?.round()? / 10.0)?.relu()?;
        let mut v = x.flatten_all()?.to_vec1::<f64>()?;
        v[17] = f64::NAN;
        v[40] = f64::NAN;
        let x = Tensor::from_vec(v, x.shape(), &Device::Cpu)?;
        for dtype in [DType::F32, DType::F64] {
            let x = x.to_dtype(dtype)?;
            for (k, s, p) in [(2, 2, 0), (3, 2, 1), (3, 1, 1), (3, 2, 0), (4, 3, 2), (1, 1, 0)] {
                let g = Pool::new(&x, k, s, p)?;
                let a = argmax_cpu(&x, &g)?.to_dtype(DType::I64)?.flatten_all()?.to_vec1::<i64>()?;
                let b = argmax_tensor_ops(&x, &g)?.flatten_all()?.to_vec1::<i64>()?;
                assert_eq!(a, b, "k={k} s={s} p={p} {dtype:?}");
            }
        }
        Ok(())
    }

    #[test]
    fn rejects_bad_geometry() -> Result<()> {
        let x = Tensor::zeros((1, 1, 4, 4), DType::F32, &Device::Cpu)?;
        assert!(max_pool2d(&x, 3, 2, 2).is_err(), "padding above kernel/2");
        assert!(max_pool2d(&x, 5, 1, 0).is_err(), "kernel above input");
        assert!(max_pool2d(&x, 2, 0, 0).is_err(), "zero stride");
        assert!(max_pool2d(&x.squeeze(0)?, 2, 2, 0).is_err(), "not NCHW");
        Ok(())
    }

    #[test]
    fn global_avg_pool_means_each_map() -> Result<()> {
        let x = Tensor::arange(0f32, 24., &Device::Cpu)?.reshape((2, 3, 2, 2))?;
        let y = global_avg_pool(&x)?;
        assert_eq!(y.dims(), &[2, 3]);
        let expected: Vec<f32> = (0..6).map(|m| 4.0 * m as f32 + 1.5).collect();
        assert_eq!(y.flatten_all()?.to_vec1::<f32>()?, expected);
        Ok(())
    }

    /// `cargo test --release --lib nn::pool -- --ignored --nocapture`: the ImageNet stem pool.
    #[test]
    #[ignore]
    fn bench_stem_pool() -> Result<()> {
        let x = Var::from_tensor(&(spaced((16, 64, 112, 112))?.to_dtype(DType::F32)?))?;
        let g = Pool::new(&x, 3, 2, 1)?;
        let time = |name: &str, f: &dyn Fn() -> Result<()>| -> Result<()> {
            f()?;
            let t = std::time::Instant::now();
            for _ in 0..5 {
                f()?;
            }
            println!("{name}: {:.1} ms", t.elapsed().as_secs_f64() * 1e3 / 5.0);
            Ok(())
        };
        time("argmax, CPU loop", &|| argmax_cpu(&x, &g).map(drop))?;
        time("argmax, tensor ops", &|| argmax_tensor_ops(&x, &g).map(drop))?;
        time("forward", &|| max_pool2d(&x, 3, 2, 1).map(drop))?;
        time("forward + backward", &|| max_pool2d(&x, 3, 2, 1)?.sum_all()?.backward().map(drop))?;
        time("candle max_pool2d(2), forward + backward", &|| x.max_pool2d(2)?.sum_all()?.backward().map(drop))?;
        time("forward + backward, k=s=2", &|| max_pool2d(&x, 2, 2, 0)?.sum_all()?.backward().map(drop))?;
        Ok(())
    }
}
