//! A 2-D convolution whose backward avoids candle 0.11.1's slow paths.
//!
//! candle's forward conv2d is an im2col + gemm and fast. Its backward is not:
//! - the input gradient goes through `conv_transpose2d`, a naive loop on CPU (and CUDA) that
//!   took most of a ResNet training step (candle-notes: 80–85% of a step is the backward);
//! - for `groups > 1` the forward is `chunk` + one conv per group + `cat`, so the backward of
//!   every `chunk` pads its group's input gradient back to the full input size before the sum:
//!   `groups` full-size tensors for one gradient (PResNet-50's 128-group res7, docs/performance.md).
//!
//! [`conv2d`] keeps candle's forward and computes the backward itself, with forward
//! convolutions only:
//! - input gradient: a stride-1 convolution of the output gradient — zero-dilated by the stride,
//!   padded by `k − 1 − p` (plus `(H + 2p − k) mod s` rows/columns on the far side, which the
//!   forward's floor division dropped) — with the spatially flipped kernel whose in/out channels
//!   are swapped within each group;
//! - kernel gradient: candle's own formula (`xᵀ ⋆ gᵀ` with the stride as dilation), with the
//!   groups moved into the channel axis so that all groups go through one grouped convolution.
//!
//! Both are one op in the graph, so a grouped convolution holds one input gradient, not one per
//! group. The forward copies its input and output once (a `CustomOp2` gets raw storage, and
//! candle offers no way to run its conv on borrowed storage or to move a tensor's storage out).

use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Storage, Tensor};

/// When set, [`conv2d`] is candle's own `conv2d` (for before/after benchmarks).
static CANDLE_REFERENCE: AtomicBool = AtomicBool::new(false);

/// Routes [`conv2d`] to candle's own `conv2d` and its backward (`true`) or to this op (`false`,
/// the default). Process-wide; meant for benchmarks that compare the two.
pub fn use_candle_reference(on: bool) {
    CANDLE_REFERENCE.store(on, Ordering::Relaxed);
}

/// Geometry of one convolution, all a backward needs besides the two inputs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct ConvOp {
    padding: usize,
    stride: usize,
    groups: usize,
}

/// `x ⋆ w` with candle's forward and a backward built from forward convolutions.
///
/// Same arguments and result as `x.conv2d(w, padding, stride, 1, groups)` (dilation 1 only);
/// gradients equal candle's to rounding. CPU only: on other devices this falls back to candle's
/// own conv2d (and its backward).
///
/// # Shapes
/// - `x`: `[N, C, H, W]`, `w`: `[O, C/groups, k, k]` → `[N, O, (H + 2p − k)/s + 1, …]`.
pub fn conv2d(x: &Tensor, w: &Tensor, padding: usize, stride: usize, groups: usize) -> Result<Tensor> {
    let (_, c, h, wd) = x.dims4()?;
    let (o, ci, kh, kw) = w.dims4()?;
    if groups == 0 || ci * groups != c || !o.is_multiple_of(groups) {
        candle_core::bail!("conv2d: input {:?} and kernel {:?} do not match groups {groups}", x.dims(), w.dims())
    }
    if stride == 0 || h + 2 * padding < kh || wd + 2 * padding < kw {
        candle_core::bail!(
            "conv2d: kernel {kh}×{kw} with padding {padding}, stride {stride} does not fit input {h}×{wd}"
        )
    }
    if CANDLE_REFERENCE.load(Ordering::Relaxed)
        || !x.device().is_cpu()
        || x.dtype() != w.dtype()
        || !matches!(x.dtype(), DType::F32 | DType::F64)
    {
        return x.conv2d(w, padding, stride, 1, groups);
    }
    x.apply_op2(w, ConvOp { padding, stride, groups })
}

/// A contiguous CPU tensor holding a copy of `(storage, layout)`.
fn to_tensor(s: &CpuStorage, l: &Layout) -> Result<Tensor> {
    let dev = candle_core::Device::Cpu;
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((a, b))) => Tensor::from_slice(&v[a..b], l.shape(), &dev),
        (CpuStorage::F64(v), Some((a, b))) => Tensor::from_slice(&v[a..b], l.shape(), &dev),
        // A strided view (a transposed or narrowed tensor): candle makes it contiguous.
        (s, None) => {
            let mut dst = match s {
                CpuStorage::F32(_) => CpuStorage::F32(vec![0.; l.shape().elem_count()]),
                CpuStorage::F64(_) => CpuStorage::F64(vec![0.; l.shape().elem_count()]),
                _ => candle_core::bail!("conv2d: unsupported dtype {:?}", s.dtype()),
            };
            s.copy_strided_src(&mut dst, 0, l)?;
            to_tensor(&dst, &Layout::contiguous(l.shape()))
        }
        (s, _) => candle_core::bail!("conv2d: unsupported dtype {:?}", s.dtype()),
    }
}

impl CustomOp2 for ConvOp {
    fn name(&self) -> &'static str {
        "conv2d-fast-bwd"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        // These tensors carry no graph: the op's backward is `bwd` below.
        let x = to_tensor(s1, l1)?;
        let w = to_tensor(s2, l2)?;
        let y = x.conv2d(&w, self.padding, self.stride, 1, self.groups)?.contiguous()?;
        let (storage, layout) = y.storage_and_layout();
        match &*storage {
            Storage::Cpu(s) => Ok((s.try_clone(layout)?, y.shape().clone())),
            _ => candle_core::bail!("conv2d: cpu_fwd produced a non-CPU tensor"),
        }
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, _y: &Tensor, g: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        // Detached: nothing below needs a graph, and ops on a tracked `Var` would record one.
        let (x, w, g) = (x.detach(), w.detach(), g.detach());
        let dx = self.input_grad(&x, &w, &g)?;
        let dw = self.kernel_grad(&x, &w, &g)?;
        Ok((Some(dx), Some(dw)))
    }
}

impl ConvOp {
    /// `∂L/∂x` as a stride-1 convolution of the dilated, padded output gradient.
    ///
    /// # Shapes
    /// - `x`: `[N, C, H, W]`, `w`: `[O, C/g, k, k]`, `g`: `[N, O, OH, OW]` → `[N, C, H, W]`.
    fn input_grad(&self, x: &Tensor, w: &Tensor, g: &Tensor) -> Result<Tensor> {
        let (_, c, h, wd) = x.dims4()?;
        let (o, ci, kh, kw) = w.dims4()?;
        let groups = self.groups;
        // [O, C/g, k, k] → [g, O/g, C/g, k, k] → [g, C/g, O/g, k, k] → [C, O/g, k, k], flipped.
        let wt = w
            .reshape((groups, o / groups, ci, kh, kw))?
            .transpose(1, 2)?
            .reshape((c, o / groups, kh, kw))?
            .flip(&[2, 3])?;
        let g = self.spread(g, 2, h, kh)?;
        let g = self.spread(&g, 3, wd, kw)?;
        g.conv2d(&wt, 0, 1, 1, groups)
    }

    /// Along `dim` of the output gradient: insert `s − 1` zeros between elements and pad so that
    /// a stride-1, padding-0 convolution with a `k`-wide kernel gives `size` outputs.
    ///
    /// The dilated gradient has `L = (OH − 1)s + 1` elements; the far side needs `r = (size + 2p −
    /// k) mod s` extra zeros for the input rows the forward's floor division never read, and both
    /// sides need `k − 1 − p` (negative: crop).
    fn spread(&self, g: &Tensor, dim: usize, size: usize, k: usize) -> Result<Tensor> {
        let (s, p) = (self.stride, self.padding);
        let n = g.dim(dim)?;
        let r = (size + 2 * p - k) % s;
        let g = if s > 1 {
            // [.., n, ..] → [.., n, 1, ..] → [.., n, s, ..] (zeros after each) → [.., n·s, ..],
            // then drop the trailing zeros beyond r.
            let mut dims = g.dims().to_vec();
            dims.insert(dim + 1, 1);
            let spread = g.reshape(dims.as_slice())?.pad_with_zeros(dim + 1, 0, s - 1)?;
            dims[dim] = n * s;
            dims.remove(dim + 1);
            spread.reshape(dims.as_slice())?.narrow(dim, 0, (n - 1) * s + 1 + r)?
        } else {
            g.clone()
        };
        let len = g.dim(dim)?;
        if k > p {
            let edge = k - 1 - p;
            // r is 0 when s = 1; for s > 1 the narrow above already holds the r extra zeros.
            g.pad_with_zeros(dim, edge, edge)
        } else {
            // Padding at least as wide as the kernel: the outermost p − k + 1 inputs on each side
            // are padding-only positions whose gradient would be cropped.
            let crop = p + 1 - k;
            g.narrow(dim, crop, len - 2 * crop)
        }
    }

    /// `∂L/∂w`: candle's formula `(xᵀ ⋆ gᵀ)ᵀ`, stride as dilation, all groups in one call.
    ///
    /// Groups go into the channel axis: `x` as `[C/g, g·N, H, W]` and `g` as `[O, N, OH, OW]`
    /// convolved with `groups` pairs the `N` images of group `j` with its `O/g` kernels.
    ///
    /// # Shapes
    /// - `x`: `[N, C, H, W]`, `w`: `[O, C/g, k, k]`, `g`: `[N, O, OH, OW]` → `[O, C/g, k, k]`.
    fn kernel_grad(&self, x: &Tensor, w: &Tensor, g: &Tensor) -> Result<Tensor> {
        let (n, c, h, wd) = x.dims4()?;
        let (o, ci, kh, kw) = w.dims4()?;
        let groups = self.groups;
        let xt = if groups == 1 {
            x.transpose(0, 1)?
        } else {
            // [N, C, H, W] → [N, g, C/g, H, W] → [C/g, g, N, H, W] → [C/g, g·N, H, W]
            x.reshape((n, groups, ci, h, wd))?.permute((2, 1, 0, 3, 4))?.contiguous()?.reshape((
                ci,
                groups * n,
                h,
                wd,
            ))?
        };
        let gt = g.transpose(0, 1)?; // [O, N, OH, OW]; O is group-major already
        let dw = xt.conv2d(&gt, self.padding, 1, self.stride, groups)?.transpose(0, 1)?; // [O, C/g, k', k']
        let (_, _, dkh, dkw) = dw.dims4()?;
        let dw = if dkh != kh || dkw != kw { dw.narrow(2, 0, kh)?.narrow(3, 0, kw)? } else { dw };
        debug_assert_eq!(dw.dims(), &[o, ci, kh, kw]);
        Ok(dw)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::gradcheck::gradcheck;
    use candle_core::{Device, Var};
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;
    use rand_distr::{Distribution, StandardNormal};

    fn randn(shape: &[usize], seed: u64, dtype: DType) -> Result<Tensor> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let n: usize = shape.iter().product();
        let v: Vec<f64> = (0..n).map(|_| StandardNormal.sample(&mut rng)).collect();
        Tensor::from_vec(v, shape, &Device::Cpu)?.to_dtype(dtype)
    }

    /// `max |a − b| / max |b|` (a relative error that is not blown up by near-zero elements).
    fn rel(a: &Tensor, b: &Tensor) -> Result<f64> {
        let diff = a.sub(b)?.abs()?.max_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        let size = b.abs()?.max_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        Ok(diff / size.max(1e-30))
    }

    /// (in, out, k, stride, padding, groups, H, W): every combination the brief asks for.
    const CASES: &[(usize, usize, usize, usize, usize, usize, usize, usize)] = &[
        (3, 5, 3, 1, 1, 1, 7, 9),
        (3, 5, 3, 2, 1, 1, 7, 9),
        (3, 4, 3, 2, 0, 1, 15, 15),
        (4, 6, 1, 1, 0, 1, 7, 9),
        (4, 6, 1, 2, 0, 1, 15, 15),
        (3, 4, 7, 2, 3, 1, 15, 15),
        (3, 4, 7, 1, 3, 1, 7, 9),
        (4, 6, 3, 1, 1, 2, 7, 9),
        (4, 8, 3, 2, 1, 4, 15, 15),
        (8, 4, 1, 2, 0, 4, 7, 9),
        (6, 6, 3, 1, 1, 6, 7, 9),   // depthwise
        (6, 6, 3, 2, 1, 6, 15, 15), // depthwise, strided
        (4, 4, 7, 2, 3, 4, 15, 15), // depthwise 7×7
        (2, 3, 3, 3, 0, 1, 8, 10),  // (H + 2p − k) mod s = 2 and 1
        (2, 3, 1, 1, 1, 1, 5, 6),   // padding ≥ kernel: cropped input gradient
    ];

    /// Values and both gradients against candle's own conv2d and its backward.
    fn against_candle(dtype: DType, tol: f64) -> Result<()> {
        for (i, &(c, o, k, s, p, g, h, w)) in CASES.iter().enumerate() {
            if (h + 2 * p - k) % s != (w + 2 * p - k) % s {
                // candle's backward takes the output padding of its conv_transpose2d from the
                // height alone and fails with a shape mismatch here: gradcheck covers this case.
                continue;
            }
            let x = Var::from_tensor(&randn(&[2, c, h, w], i as u64, dtype)?)?;
            let wt = Var::from_tensor(&randn(&[o, c / g, k, k], 100 + i as u64, dtype)?)?;
            let ours = conv2d(x.as_tensor(), wt.as_tensor(), p, s, g)?;
            let theirs = x.as_tensor().conv2d(wt.as_tensor(), p, s, 1, g)?;
            assert_eq!(ours.dims(), theirs.dims(), "case {i}");
            // A random projection so that every output element has its own weight.
            let proj = randn(ours.dims(), 200 + i as u64, dtype)?;
            let go = ours.mul(&proj)?.sum_all()?.backward()?;
            let gt = theirs.mul(&proj)?.sum_all()?.backward()?;
            let e = [
                rel(&ours, &theirs)?,
                rel(go.get(&x).expect("dx"), gt.get(&x).expect("dx"))?,
                rel(go.get(&wt).expect("dw"), gt.get(&wt).expect("dw"))?,
            ];
            assert!(e.iter().all(|e| *e <= tol), "case {i} {:?}: value/dx/dw rel err {e:?}", CASES[i]);
        }
        Ok(())
    }

    #[test]
    fn matches_candle_in_f32() -> Result<()> {
        against_candle(DType::F32, 1e-4)
    }

    #[test]
    fn matches_candle_in_f64() -> Result<()> {
        against_candle(DType::F64, 1e-12)
    }

    #[test]
    /// Conv is linear, so the finite difference has no truncation error, only rounding
    /// (~1e-16·|L|/ε ≈ 1e-9 absolute); a wrong gradient is off by O(1).
    fn gradcheck_input_and_kernel_f64() -> Result<()> {
        for (i, &(c, o, k, s, p, g, h, w)) in CASES.iter().enumerate() {
            let x = randn(&[1, c, h, w], i as u64, DType::F64)?;
            let wt = randn(&[o, c / g, k, k], 100 + i as u64, DType::F64)?;
            let r = gradcheck(|x| conv2d(x, &wt, p, s, g), &x, 1e-5, 7)?;
            assert!(r.max_rel_err < 1e-5, "case {i} {:?} input: {r}", CASES[i]);
            let r = gradcheck(|wt| conv2d(&x, wt, p, s, g), &wt, 1e-5, 8)?;
            assert!(r.max_rel_err < 1e-5, "case {i} {:?} kernel: {r}", CASES[i]);
        }
        Ok(())
    }

    #[test]
    fn strided_input_view_is_read_correctly() -> Result<()> {
        // A transposed (non-contiguous) input goes through the strided copy in `to_tensor`.
        let x = randn(&[2, 3, 9, 7], 1, DType::F32)?.transpose(2, 3)?;
        let w = randn(&[4, 3, 3, 3], 2, DType::F32)?;
        let ours = conv2d(&x, &w, 1, 2, 1)?;
        assert!(rel(&ours, &x.conv2d(&w, 1, 2, 1, 1)?)? < 1e-6);
        Ok(())
    }

    #[test]
    fn rejects_mismatched_groups() {
        let x = Tensor::zeros((1, 6, 5, 5), DType::F32, &Device::Cpu).expect("zeros");
        let w = Tensor::zeros((4, 3, 3, 3), DType::F32, &Device::Cpu).expect("zeros");
        assert!(conv2d(&x, &w, 1, 1, 4).is_err());
        assert!(conv2d(&x, &w, 1, 1, 2).is_ok());
    }
}
