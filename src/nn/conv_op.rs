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
//! - input gradient: a stride-1 convolution of the output gradient, padded by `k − 1 − p`, with
//!   the spatially flipped kernel whose in/out channels are swapped within each group. For
//!   stride `s > 1` the gradient is not zero-dilated (that multiplies by zero `s² − 1` times out
//!   of `s²`): each of the `s²` input phases is a stride-1 convolution of the undilated gradient
//!   with the taps of the flipped kernel that reach it, and the phases are interleaved (rows and
//!   columns the forward's floor division never read get zero). Not computed when the input
//!   needs no gradient (the stem);
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

/// Along one axis of a stride-`s` convolution's input gradient, the inputs `i = a + s·q`
/// (`q < len`): they see the flipped-kernel taps `first_tap + s·j` (`j < taps`) applied to the
/// output gradient at `q + j + offset`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Phase {
    first_tap: usize,
    taps: usize,
    stride: usize,
    offset: isize,
    len: usize,
}

impl Phase {
    /// Indices of this phase's taps in the flipped kernel, for `index_select`.
    fn tap_index(&self, device: &candle_core::Device) -> Result<Tensor> {
        let idx: Vec<u32> = (0..self.taps).map(|j| (self.first_tap + self.stride * j) as u32).collect();
        Tensor::from_vec(idx, self.taps, device)
    }
}

/// The `s` phases of an input side `size` under a `k`-wide kernel with stride `s`, padding `p`.
///
/// With `P = k − 1 − p`, the flipped kernel's tap `t` pairs input `i` with output `(i + t − P)/s`
/// when that divides: for `i = a + s·q` exactly the taps `t ≡ P − a (mod s)`.
fn phases(size: usize, k: usize, s: usize, p: usize) -> Vec<Phase> {
    let pl = k as isize - 1 - p as isize;
    (0..s)
        .map(|a| {
            let first_tap = (pl - a as isize).rem_euclid(s as isize) as usize;
            Phase {
                first_tap,
                taps: if first_tap < k { (k - first_tap).div_ceil(s) } else { 0 },
                stride: s,
                offset: (a as isize + first_tap as isize - pl) / s as isize,
                len: size.saturating_sub(a).div_ceil(s),
            }
        })
        .collect()
}

/// `out[m] = t[m + offset]` along `dim` for `m < len`, zero where that falls outside `t`.
fn window(t: &Tensor, dim: usize, offset: isize, len: usize) -> Result<Tensor> {
    let n = t.dim(dim)? as isize;
    let start = offset.clamp(0, n);
    let end = (offset + len as isize).clamp(0, n);
    if end <= start {
        let mut dims = t.dims().to_vec();
        dims[dim] = len;
        return Tensor::zeros(dims, t.dtype(), t.device());
    }
    let left = (start - offset) as usize;
    let kept = (end - start) as usize;
    t.narrow(dim, start as usize, kept)?.pad_with_zeros(dim, left, len - left - kept)
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
        // A gradient nobody asked for is not computed: the stem's input is data.
        let (need_dx, need_dw) = (x.track_op(), w.track_op());
        let (x, w, g) = (x.detach(), w.detach(), g.detach());
        let dx = if need_dx { Some(self.input_grad(&x, &w, &g)?) } else { None };
        let dw = if need_dw { Some(self.kernel_grad(&x, &w, &g)?) } else { None };
        Ok((dx, dw))
    }
}

impl ConvOp {
    /// `∂L/∂x` as stride-1 convolutions of the output gradient with the flipped, per-group
    /// in/out-transposed kernel: one (padded) for stride 1, one per output phase for stride > 1.
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
        if self.stride == 1 {
            let g = self.spread(g, 2, kh)?;
            let g = self.spread(&g, 3, kw)?;
            return g.conv2d(&wt, 0, 1, 1, groups);
        }
        let (s, p) = (self.stride, self.padding);
        let (rh, rw) = ((h + 2 * p - kh) % s, (wd + 2 * p - kw) % s);
        if groups == 1 && c < 8 && rh == rw {
            // A few input channels (an image stem whose input needs a gradient): s² convolutions
            // with ≤ 8 output channels keep gemm's tiles empty, and candle's loop is faster
            // (7×7/2, 3 channels: 4× faster). Its single output padding needs rh == rw.
            return g.conv_transpose2d(w, p, rh, s, 1);
        }
        // Strided: the zero-dilated gradient would make s² − 1 of every s² multiplications
        // with a zero (4× the forward's work at s = 2, slower than candle's loop). Instead, each
        // output phase (i mod s) reads only the taps b, b + s, … of the flipped kernel from the
        // undilated gradient: s² stride-1 convolutions, interleaved.
        let (ph, pw) = (phases(h, kh, s, p), phases(wd, kw, s, p));
        let (n, _, _, _) = g.dims4()?;
        let (qh, qw) = (ph[0].len, pw[0].len);
        let mut rows = Vec::with_capacity(s);
        for a in &ph {
            let mut cols = Vec::with_capacity(s);
            for b in &pw {
                let part = if a.taps == 0 || b.taps == 0 || a.len == 0 || b.len == 0 {
                    Tensor::zeros((n, c, a.len, b.len), g.dtype(), g.device())?
                } else {
                    let gw = window(g, 2, a.offset, a.len + a.taps - 1)?;
                    let gw = window(&gw, 3, b.offset, b.len + b.taps - 1)?;
                    let k = wt.index_select(&a.tap_index(g.device())?, 2)?;
                    let k = k.index_select(&b.tap_index(g.device())?, 3)?;
                    gw.conv2d(&k, 0, 1, 1, groups)?
                };
                // Phases past the first can be one shorter; pad so that all stack.
                cols.push(part.pad_with_zeros(2, 0, qh - a.len)?.pad_with_zeros(3, 0, qw - b.len)?);
            }
            rows.push(Tensor::stack(&cols, 4)?); // [N, C, qh, qw, s]
        }
        Tensor::stack(&rows, 3)? // [N, C, qh, s, qw, s]
            .reshape((n, c, qh * s, qw * s))?
            .narrow(2, 0, h)?
            .narrow(3, 0, wd)
    }

    /// Stride 1: pad `dim` of the output gradient by `k − 1 − p` on both sides (crop when the
    /// padding is at least the kernel: those outermost inputs are padding-only positions), so
    /// that a padding-0 convolution with a `k`-wide kernel gives one output per input.
    fn spread(&self, g: &Tensor, dim: usize, k: usize) -> Result<Tensor> {
        let p = self.padding;
        if k > p {
            g.pad_with_zeros(dim, k - 1 - p, k - 1 - p)
        } else {
            let crop = p + 1 - k;
            g.narrow(dim, crop, g.dim(dim)? - 2 * crop)
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
        let (n, _, h, wd) = x.dims4()?;
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
    type Case = (usize, usize, usize, usize, usize, usize, usize, usize);
    const CASES: &[Case] = &[
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
        (2, 3, 1, 3, 1, 1, 8, 7),   // stride > kernel: phases with no taps
        (3, 4, 7, 3, 3, 1, 16, 13), // stride 3, 7×7
        (4, 4, 5, 2, 1, 2, 9, 9),   // padding < k/2
        // ≥ 8 input channels: strided input gradients by phase (fewer go to conv_transpose2d)
        (8, 4, 3, 2, 1, 1, 15, 15),
        (8, 4, 3, 2, 0, 1, 7, 9),
        (8, 3, 1, 2, 0, 1, 7, 9),
        (8, 3, 1, 3, 1, 1, 8, 7),   // stride > kernel: phases with no taps
        (8, 6, 7, 3, 3, 1, 16, 13), // stride 3, 7×7, remainders 1 and 0
        (8, 6, 7, 2, 3, 1, 15, 15),
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
    fn skips_the_gradient_of_an_untracked_input() -> Result<()> {
        // The stem's input is data: only the kernel gets a gradient, and no time is spent on dx.
        let x = randn(&[1, 3, 9, 9], 1, DType::F32)?;
        let w = Var::from_tensor(&randn(&[4, 3, 7, 7], 2, DType::F32)?)?;
        let grads = conv2d(&x, w.as_tensor(), 3, 2, 1)?.sum_all()?.backward()?;
        assert!(grads.get(&x).is_none() && grads.get(&w).is_some());
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
