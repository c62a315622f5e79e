//! A 2-D convolution op whose forward and backward are locograph's own CPU kernels.
//!
//! candle 0.11.1's CPU conv2d is slow on both sides: the forward runs one small gemm per image
//! and 512-pixel tile behind a single-threaded NCHW→NHWC copy of the batch, the input gradient
//! goes through `conv_transpose2d`, a naive loop (candle-notes: 80–85 % of a step), and for
//! `groups > 1` the backward of candle's `chunk` + `cat` pads every group's input gradient back to
//! the full input size (`groups` full-size tensors for one gradient).
//!
//! [`conv2d`] is one `CustomOp2` whose forward and backward are [`super::im2col`]: im2col + gemm
//! for the forward and the kernel gradient, gemm + col2im for the input gradient, all groups in
//! one op, chunked over images so that both cores run large single-threaded gemms. The input
//! gradient is not computed when the input needs none (the stem's input is data).
//!
//! Where locograph is built with oneDNN ([`crate::dnnl`]), the same op runs oneDNN's kernels
//! instead, in f32 and in bf16 (`precision: bf16` on CPU; refused with the reason without
//! oneDNN, where candle's CPU conv has no bf16 matmul). Other devices and dtypes (CUDA, f16) fall
//! back to candle's conv2d and its backward.

use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor, WithDType};

use super::im2col::{self, Geometry};
use crate::cpu_slice::{
    activation_from_vec, storage_activation, storage_slice, with_activation, with_activation_in, with_slice, Order,
};
use crate::dnnl::{self, Orders};

/// When set, [`conv2d`] is candle's own `conv2d` (for before/after benchmarks).
static CANDLE_REFERENCE: AtomicBool = AtomicBool::new(false);

/// Routes [`conv2d`] to candle's own `conv2d` and its backward (`true`) or to this op (`false`,
/// the default). Process-wide; meant for benchmarks that compare the two.
pub fn use_candle_reference(on: bool) {
    CANDLE_REFERENCE.store(on, Ordering::Relaxed);
}

/// Which kernels [`conv2d`] runs on `device` in `dtype`, for a run's `derived.json`: oneDNN's
/// with the implementation it picks for a 3×3 convolution (64 → 64 channels, 16×16; the ISA is in
/// the name, e.g. `jit:avx512_core`, `brgconv:avx512_core_amx_bf16`), or locograph's im2col, or
/// candle's own conv.
pub fn backend(device: &candle_core::Device, dtype: DType) -> String {
    let cpu = device.is_cpu() && !CANDLE_REFERENCE.load(Ordering::Relaxed);
    let probe = Geometry { n: 8, c: 64, h: 16, w: 16, o: 64, kh: 3, kw: 3, stride: 1, padding: 1, groups: 1 };
    let kernels = |name: &str| -> std::result::Result<String, dnnl::DnnlError> {
        let k = |p| match dtype {
            DType::BF16 => dnnl::conv_kernel::<half::bf16>(&probe, probe_orders(), p),
            _ => dnnl::conv_kernel::<f32>(&probe, probe_orders(), p),
        };
        let (f, d, w) = (k(dnnl::Pass::Forward)?, k(dnnl::Pass::BackwardData)?, k(dnnl::Pass::BackwardWeights)?);
        Ok(format!("{name}: forward {f}, backward data {d}, backward weights {w}"))
    };
    match (cpu, dtype) {
        (true, DType::F32 | DType::BF16) if dnnl::enabled() => {
            let (a, b, c) = dnnl::version().unwrap_or_default();
            kernels(&format!("oneDNN {a}.{b}.{c}")).unwrap_or_else(|e| format!("oneDNN {a}.{b}.{c} ({e})"))
        }
        (true, DType::F32 | DType::F64) => "locograph im2col + gemm".into(),
        _ => "candle conv2d".into(),
    }
}

/// The activation orders of a convolution inside a stage, as [`conv2d`] runs them.
fn probe_orders() -> Orders {
    let y = if dnnl::channels_last() { Order::Nhwc } else { Order::Nchw };
    Orders { x: y, y }
}

/// Geometry of one convolution, all a backward needs besides the two inputs, and the order
/// its output is written in (NHWC: the op's own result is `[N, OH, OW, O]`, which [`conv2d`]
/// shows as the permuted view `[N, O, OH, OW]`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct ConvOp {
    padding: usize,
    stride: usize,
    groups: usize,
    out: Order,
}

/// `x ⋆ w` with locograph's im2col kernels for the forward and the backward.
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
    if x.device().is_cpu() && x.dtype() == DType::BF16 && !dnnl::enabled() {
        // candle's CPU conv has no bf16 matmul: say why instead of its "unsupported dtype".
        candle_core::bail!("conv2d: bf16 on CPU needs oneDNN's kernels (built with libdnnl-dev, LOCOGRAPH_DNNL not 0)")
    }
    if CANDLE_REFERENCE.load(Ordering::Relaxed)
        || !x.device().is_cpu()
        || x.dtype() != w.dtype()
        || !(matches!(x.dtype(), DType::F32 | DType::F64) || x.dtype() == DType::BF16 && dnnl::enabled())
    {
        return x.conv2d(w, padding, stride, 1, groups);
    }
    // Channels-last output on oneDNN's path (grouped convolutions keep NCHW: oneDNN 2.x has no
    // fast NHWC kernels for them). The input may be in either order.
    let nhwc = dnnl::enabled() && dnnl::channels_last() && groups == 1 && matches!(x.dtype(), DType::F32 | DType::BF16);
    let out = if nhwc { Order::Nhwc } else { Order::Nchw };
    let y = x.apply_op2(w, ConvOp { padding, stride, groups, out })?;
    match out {
        Order::Nhwc => y.permute((0, 3, 1, 2)),
        Order::Nchw => Ok(y),
    }
}

impl ConvOp {
    fn geometry(&self, x: &Shape, w: &Shape) -> Result<Geometry> {
        let (n, c, h, wd) = x.dims4()?;
        let (o, _, kh, kw) = w.dims4()?;
        Ok(Geometry { n, c, h, w: wd, o, kh, kw, stride: self.stride, padding: self.padding, groups: self.groups })
    }

    fn forward<T: WithDType>(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<Vec<T>> {
        let g = self.geometry(l1.shape(), l2.shape())?;
        Ok(im2col::forward(&storage_slice::<T>(s1, l1)?, &storage_slice::<T>(s2, l2)?, &g))
    }

    fn forward_dnnl<T: WithDType + dnnl::Element>(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<Vec<T>> {
        let g = self.geometry(l1.shape(), l2.shape())?;
        let (x, order) = storage_activation::<T>(s1, l1)?;
        dnnl::conv_forward(&g, Orders { x: order, y: self.out }, &x, &storage_slice::<T>(s2, l2)?)
            .map_err(candle_core::Error::wrap)
    }

    fn backward_dnnl<T: WithDType + dnnl::Element>(
        &self,
        x: &Tensor,
        w: &Tensor,
        dy: &Tensor,
        need: (bool, bool),
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let g = self.geometry(x.shape(), w.shape())?;
        let wrap = candle_core::Error::wrap;
        // dx in x's order (a strided view of another kind is read as NCHW), dy in the output's.
        let xo = Order::of(x.layout()).unwrap_or(Order::Nchw);
        let orders = Orders { x: xo, y: self.out };
        let dx = need
            .0
            .then(|| {
                let v = with_slice(w, |ws: &[T]| {
                    with_activation_in(dy, self.out, |dys: &[T]| dnnl::conv_backward_data(&g, orders, dys, ws))
                })??;
                activation_from_vec(v.map_err(wrap)?, x.shape(), xo, x.device())
            })
            .transpose()?;
        let dw = need
            .1
            .then(|| {
                let v = with_activation(x, |xs: &[T], xo| {
                    let orders = Orders { x: xo, y: self.out };
                    with_activation_in(dy, self.out, |dys: &[T]| dnnl::conv_backward_weights(&g, orders, xs, dys))
                })??;
                Tensor::from_vec(v.map_err(wrap)?, w.shape(), w.device())
            })
            .transpose()?;
        Ok((dx, dw))
    }

    fn backward<T: WithDType>(
        &self,
        x: &Tensor,
        w: &Tensor,
        dy: &Tensor,
        need: (bool, bool),
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let g = self.geometry(x.shape(), w.shape())?;
        let (dx, dw) = with_slice(x, |xs: &[T]| {
            with_slice(w, |ws: &[T]| with_slice(dy, |dys: &[T]| im2col::backward(xs, ws, dys, &g, need.0, need.1)))
        })???;
        let dx = dx.map(|v| Tensor::from_vec(v, x.shape(), x.device())).transpose()?;
        let dw = dw.map(|v| Tensor::from_vec(v, w.shape(), w.device())).transpose()?;
        Ok((dx, dw))
    }
}

impl CustomOp2 for ConvOp {
    fn name(&self) -> &'static str {
        "conv2d-im2col"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (n, _, _, _) = l1.shape().dims4()?;
        let g = self.geometry(l1.shape(), l2.shape())?;
        let shape = match self.out {
            Order::Nchw => Shape::from((n, g.o, g.out_h(), g.out_w())),
            Order::Nhwc => Shape::from((n, g.out_h(), g.out_w(), g.o)),
        };
        let y = match s1 {
            CpuStorage::F32(_) if dnnl::enabled() => CpuStorage::F32(self.forward_dnnl::<f32>(s1, l1, s2, l2)?),
            CpuStorage::BF16(_) => CpuStorage::BF16(self.forward_dnnl::<half::bf16>(s1, l1, s2, l2)?),
            CpuStorage::F32(_) => CpuStorage::F32(self.forward::<f32>(s1, l1, s2, l2)?),
            CpuStorage::F64(_) => CpuStorage::F64(self.forward::<f64>(s1, l1, s2, l2)?),
            s => candle_core::bail!("conv2d: unsupported dtype {:?}", s.dtype()),
        };
        Ok((y, shape))
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, _y: &Tensor, g: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        // A gradient nobody asked for is not computed: the stem's input is data. The results
        // are fresh tensors without a graph.
        let need = (x.track_op(), w.track_op());
        // `g` is the gradient of the op's own result: `[N, OH, OW, O]` for an NHWC output.
        let g = &match self.out {
            Order::Nhwc => g.permute((0, 3, 1, 2))?,
            Order::Nchw => g.clone(),
        };
        match x.dtype() {
            DType::F32 if dnnl::enabled() => self.backward_dnnl::<f32>(x, w, g, need),
            DType::BF16 => self.backward_dnnl::<half::bf16>(x, w, g, need),
            DType::F32 => self.backward::<f32>(x, w, g, need),
            DType::F64 => self.backward::<f64>(x, w, g, need),
            d => candle_core::bail!("conv2d: unsupported dtype {d:?}"),
        }
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
    fn against_candle(dtype: DType, tol: f64, batch: usize) -> Result<()> {
        for (i, &(c, o, k, s, p, g, h, w)) in CASES.iter().enumerate() {
            if (h + 2 * p - k) % s != (w + 2 * p - k) % s {
                // candle's backward takes the output padding of its conv_transpose2d from the
                // height alone and fails with a shape mismatch here: gradcheck covers this case.
                continue;
            }
            let x = Var::from_tensor(&randn(&[batch, c, h, w], i as u64, dtype)?)?;
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
        against_candle(DType::F32, 1e-4, 2)
    }

    #[test]
    /// 15 images: `nn::im2col` puts several images in one chunk (a gathered output gradient,
    /// an im2col over images) and the last chunk is shorter than the others.
    fn matches_candle_with_multi_image_chunks() -> Result<()> {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().map_err(candle_core::Error::wrap)?;
        pool.install(|| against_candle(DType::F64, 1e-12, 15))
    }

    #[test]
    fn matches_candle_in_f64() -> Result<()> {
        against_candle(DType::F64, 1e-12, 2)
    }

    #[test]
    /// Conv is linear, so the finite difference has no truncation error, only rounding
    /// (~1e-16·|L|/ε, hence the large ε); a wrong gradient is off by O(1).
    fn gradcheck_input_and_kernel_f64() -> Result<()> {
        for (i, &(c, o, k, s, p, g, h, w)) in CASES.iter().enumerate() {
            let x = randn(&[1, c, h, w], i as u64, DType::F64)?;
            let wt = randn(&[o, c / g, k, k], 100 + i as u64, DType::F64)?;
            let r = gradcheck(|x| conv2d(x, &wt, p, s, g), &x, 1e-3, 7)?;
            assert!(r.max_rel_err < 1e-5, "case {i} {:?} input: {r}", CASES[i]);
            let r = gradcheck(|wt| conv2d(&x, wt, p, s, g), &wt, 1e-3, 8)?;
            assert!(r.max_rel_err < 1e-5, "case {i} {:?} kernel: {r}", CASES[i]);
        }
        Ok(())
    }

    /// oneDNN's three passes against im2col in f64 on the same inputs (for bf16: the inputs
    /// rounded to bf16 first, so that only oneDNN's arithmetic differs), every case above plus the
    /// stem and 3×3 / 1×1 convs wide enough for oneDNN's blocked kernels. 5 images on 3 threads:
    /// chunks of 2, 2 and 1 images, whose kernel gradients are summed.
    fn dnnl_against_f64<T: WithDType + dnnl::Element>(tol: f64) -> Result<()> {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(3).build().map_err(candle_core::Error::wrap)?;
        pool.install(|| dnnl_cases::<T>(tol, 5))
    }

    fn dnnl_cases<T: WithDType + dnnl::Element>(tol: f64, n: usize) -> Result<()> {
        let mut cases = CASES.to_vec();
        cases.extend([
            (3, 16, 7, 2, 3, 1, 33, 31),
            (32, 48, 3, 1, 1, 1, 9, 9),
            (64, 32, 1, 2, 0, 1, 8, 8),
            (16, 16, 3, 1, 1, 1, 9, 7),
            // 1×1, stride 1: in bf16 on NHWC buffers, its kernel gradient is a matmul where
            // oneDNN's matmul runs on AMX.
            (48, 32, 1, 1, 0, 1, 7, 5),
        ]);
        for (i, &(c, o, k, s, p, groups, h, w)) in cases.iter().enumerate() {
            let g = Geometry { n, c, h, w, o, kh: k, kw: k, stride: s, padding: p, groups };
            let inputs = [[n, c, h, w], [o, c / groups, k, k], [n, o, g.out_h(), g.out_w()]];
            let [x, wt, dy] = [0, 1, 2].map(|j| randn(&inputs[j], 10 * i as u64 + j as u64, T::DTYPE));
            let (x, wt, dy) = (x?, wt?, dy?);
            let vec64 = |t: &Tensor| t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>();
            let y = im2col::forward(&vec64(&x)?, &vec64(&wt)?, &g);
            let (dx, dw) = im2col::backward(&vec64(&x)?, &vec64(&wt)?, &vec64(&dy)?, &g, true, true);
            let reference = [Some(y), dx, dw];
            // The elements of an NCHW tensor in `order`, and back.
            let vec = |t: &Tensor, order| match order {
                Order::Nchw => t.flatten_all()?.to_vec1::<T>(),
                Order::Nhwc => t.permute((0, 2, 3, 1))?.flatten_all()?.to_vec1::<T>(),
            };
            let nchw = |v: Vec<T>, dims: [usize; 4], order| -> Result<Vec<f64>> {
                vec64(&activation_from_vec(v, &Shape::from_dims(&dims), order, &Device::Cpu)?)
            };
            let (xd, yd) = ([n, c, h, w], [n, o, g.out_h(), g.out_w()]);
            let wrap = candle_core::Error::wrap;
            let nhwc = Order::Nhwc;
            for orders in [Orders::NCHW, Orders { x: Order::Nchw, y: nhwc }, Orders { x: nhwc, y: nhwc }] {
                let ours = [
                    nchw(
                        dnnl::conv_forward(&g, orders, &vec(&x, orders.x)?, &vec(&wt, Order::Nchw)?).map_err(wrap)?,
                        yd,
                        orders.y,
                    )?,
                    nchw(
                        dnnl::conv_backward_data(&g, orders, &vec(&dy, orders.y)?, &vec(&wt, Order::Nchw)?)
                            .map_err(wrap)?,
                        xd,
                        orders.x,
                    )?,
                    dnnl::conv_backward_weights(&g, orders, &vec(&x, orders.x)?, &vec(&dy, orders.y)?)
                        .map_err(wrap)?
                        .iter()
                        .map(|e| e.to_f64())
                        .collect(),
                ];
                for (pass, (ours, reference)) in ours.iter().zip(&reference).enumerate() {
                    let reference = reference.as_ref().expect("both gradients");
                    let size = reference.iter().fold(0f64, |m, v| m.max(v.abs()));
                    let err = ours.iter().zip(reference).fold(0f64, |m, (a, b)| m.max((a - b).abs())) / size;
                    assert!(
                        err <= tol,
                        "{:?} case {i} {:?} {orders:?} pass {pass}: rel err {err:e}",
                        T::DTYPE,
                        cases[i]
                    );
                }
            }
        }
        Ok(())
    }

    #[test]
    #[cfg_attr(not(dnnl), ignore = "built without oneDNN")]
    fn dnnl_matches_f64_in_f32() -> Result<()> {
        dnnl_against_f64::<f32>(1e-5)
    }

    #[test]
    #[cfg_attr(not(dnnl), ignore = "built without oneDNN")]
    /// bf16 results are rounded to 8 significant bits (relative step 2⁻⁸ ≈ 0.4 %): 1 % of the
    /// largest element allows that and oneDNN's f32 accumulation, not a wrong tap.
    fn dnnl_matches_f64_in_bf16() -> Result<()> {
        dnnl_against_f64::<half::bf16>(1e-2)
    }

    #[test]
    /// A bf16 convolution through the op, forward and both gradients, against the f32 op on the
    /// same (bf16-rounded) values.
    fn bf16_op_tracks_f32() -> Result<()> {
        let x = Var::from_tensor(&randn(&[4, 16, 12, 12], 1, DType::BF16)?)?;
        let w = Var::from_tensor(&randn(&[24, 16, 3, 3], 2, DType::BF16)?)?;
        if !dnnl::enabled() {
            // LOCOGRAPH_DNNL=0: refused with the reason.
            let err = conv2d(x.as_tensor(), w.as_tensor(), 1, 2, 1).expect_err("bf16 without oneDNN").to_string();
            assert!(err.contains("needs oneDNN"), "{err}");
            return Ok(());
        }
        let proj = randn(&[4, 24, 6, 6], 3, DType::F32)?;
        let loss = |x: &Tensor, w: &Tensor| conv2d(x, w, 1, 2, 1)?.to_dtype(DType::F32)?.mul(&proj)?.sum_all();
        let g16 = loss(x.as_tensor(), w.as_tensor())?.backward()?;
        let (x32, w32) = (Var::from_tensor(&x.to_dtype(DType::F32)?)?, Var::from_tensor(&w.to_dtype(DType::F32)?)?);
        let g32 = loss(x32.as_tensor(), w32.as_tensor())?.backward()?;
        for (a, b) in [(g16.get(&x), g32.get(&x32)), (g16.get(&w), g32.get(&w32))] {
            let (a, b) = (a.expect("bf16 gradient"), b.expect("f32 gradient"));
            assert_eq!(a.dtype(), DType::BF16);
            assert!(rel(&a.to_dtype(DType::F32)?, b)? < 1e-2);
        }
        Ok(())
    }

    #[test]
    #[cfg_attr(not(dnnl), ignore = "built without oneDNN")]
    fn dnnl_names_its_kernels_and_workspace() -> Result<()> {
        let g = Geometry { n: 8, c: 64, h: 16, w: 16, o: 64, kh: 3, kw: 3, stride: 1, padding: 1, groups: 1 };
        for pass in [dnnl::Pass::Forward, dnnl::Pass::BackwardData, dnnl::Pass::BackwardWeights] {
            let kernel = dnnl::conv_kernel::<f32>(&g, Orders::NCHW, pass).map_err(candle_core::Error::wrap)?;
            assert!(kernel.contains(':') && !kernel.contains("ref"), "{pass:?}: {kernel}");
            // oneDNN keeps 64-channel maps in a blocked layout: the forward copies the input and
            // the output (8·64·16·16 f32 = 512 KiB each), the backward passes the two maps they read.
            let bytes = dnnl::conv_workspace_bytes::<f32>(&g, Orders::NCHW, pass).map_err(candle_core::Error::wrap)?;
            assert!((1 << 20..64 << 20).contains(&bytes), "{pass:?}: {bytes} bytes");
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
