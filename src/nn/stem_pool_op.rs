//! The ImageNet stem's tail, `max_pool(relu(bn(z)))` with the batch norm in training mode, as
//! one op that never stores `bn(z)`.
//!
//! Composed (the fused BN + ReLU, then the gather-based max pool), the stem keeps the conv
//! output `z` (for the batch norm's backward), the rectified map (the pool's input, which the
//! gather holds, and the ReLU's mask), the pool's output and its argmax positions: for
//! ResNet-50 at 16 views 51 + 51 + 13 + 13 MB, in every method's peak. ReLU is monotonic, so it
//! commutes with the maximum: `max_pool(relu(h)) = relu(max_pool(h))`, value for value. Here the
//! op normalises `z` into a transient buffer, pools it, rectifies the 4× smaller result and
//! keeps only the positions of the maxima; the backward scatters the output's gradient where
//! the output is positive and runs the batch norm's backward from `z`.
//!
//! Same values and gradients as the composed path, bit for bit: a window whose maximum is
//! positive has the same (first) maximum in `h` and in `relu(h)`, and a window whose maximum is
//! not positive passes no gradient either way. (Only a NaN differs: the composed ReLU turns it
//! into 0 before the pool sees it, here it wins its window and the output is 0.)
//!
//! A channels-last `z` (what oneDNN's convolution leaves) stays channels-last: the batch norm
//! runs in that order and the pool takes each window's maximum for all channels of a pixel at
//! once, as vector compares and selects, so the output is channels-last for the next stage's
//! convolution. Read as NCHW, ResNet-50's bf16 stem at 16 views paid a copy of the 51 MB map
//! to NCHW and a scalar bf16 argmax over it: 11 % of a training step's CPU time.

use std::borrow::Cow;
use std::sync::{Arc, Mutex};

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::act::Lane;
use super::batch_norm_op::BatchNormTrain;
use super::pool::{argmax_planes, Pool};
use crate::cpu_slice::{activation_from_vec, storage_activation, storage_slice, with_activation_in, with_slice, Order};
use crate::simd;

/// `max_pool(relu(bn(z)))`, applied to `(z, γ, β)`: the batch norm is `bn` (the batch's
/// statistics, no ReLU of its own), the pool `kernel`/`stride`/`padding` as
/// [`super::max_pool2d`].
pub struct BnReluMaxPool {
    bn: BatchNormTrain,
    pool: Pool,
    /// In-plane position of each output's maximum (`[N·C, OH·OW]`), set by the forward.
    positions: Mutex<Option<Arc<Vec<u32>>>>,
}

impl BnReluMaxPool {
    /// The op for `z` as it lies in memory (NCHW or NHWC).
    pub fn new(bn: BatchNormTrain, z: &Tensor, kernel: usize, stride: usize, padding: usize) -> Result<Self> {
        Ok(Self {
            bn: bn.with_relu(false).for_input(z),
            pool: Pool::new(z, kernel, stride, padding)?,
            positions: Mutex::new(None),
        })
    }

    /// `op(z; γ, β)` as an `[N, C, OH, OW]` tensor in `z`'s order (the op's own result is
    /// `[N, OH, OW, C]` for an NHWC input, shown as the permuted view).
    pub fn apply(self, z: &Tensor, gamma: &Tensor, beta: &Tensor) -> Result<Tensor> {
        let order = self.bn.order();
        let out = z.apply_op3(gamma, beta, self)?;
        match order {
            Order::Nhwc => out.permute((0, 3, 1, 2)),
            Order::Nchw => Ok(out),
        }
    }

    fn forward<T: super::batch_norm_op::Act>(&self, z: &[T], gamma: &[T], beta: &[T]) -> Result<Vec<T>> {
        let g = &self.pool;
        let h = self.bn.forward(z, gamma, beta, g.c, g.h * g.w);
        if self.bn.order() == Order::Nhwc {
            let (out, positions) = pool_relu_nhwc(&h, g);
            self.keep(positions)?;
            return Ok(out);
        }
        let positions = argmax_planes(&h, g);
        let (plane_in, plane_out) = (g.h * g.w, g.oh * g.ow);
        let zero = T::zero();
        let mut out = vec![zero; positions.len()];
        out.par_chunks_mut(plane_out).zip(positions.par_chunks(plane_out)).zip(h.par_chunks(plane_in)).for_each(
            |((out, at), h)| {
                for (o, &i) in out.iter_mut().zip(at) {
                    let v = h[i as usize];
                    *o = if v > zero { v } else { zero };
                }
            },
        );
        self.keep(positions)?;
        Ok(out)
    }

    /// `z` in the op's order: NCHW gathered if strided, NHWC as it lies.
    fn input<'a, T: candle_core::WithDType>(&self, s: &'a CpuStorage, l: &Layout) -> Result<Cow<'a, [T]>> {
        match self.bn.order() {
            Order::Nchw => storage_slice(s, l),
            Order::Nhwc => match storage_activation(s, l)? {
                (z, Order::Nhwc) => Ok(z),
                _ => candle_core::bail!("stem pool: an NHWC op applied to an input that is not NHWC"),
            },
        }
    }

    /// Keeps the forward's positions of the maxima for the backward.
    fn keep(&self, positions: Vec<u32>) -> Result<()> {
        *self.positions.lock().map_err(|_| candle_core::Error::Msg("stem pool lock poisoned".into()))? =
            Some(Arc::new(positions));
        Ok(())
    }

    fn bwd_typed<T: super::batch_norm_op::Act>(
        &self,
        z: &Tensor,
        gamma: &Tensor,
        out: &Tensor,
        dout: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let g = &self.pool;
        let positions = self
            .positions
            .lock()
            .map_err(|_| candle_core::Error::Msg("stem pool lock poisoned".into()))?
            .clone()
            .ok_or_else(|| candle_core::Error::Msg("stem pool: backward before forward".into()))?;
        let (plane_in, plane_out) = (g.h * g.w, g.oh * g.ow);
        let order = self.bn.order();
        // The gradient reaching bn(z): each output's, at its maximum, where the ReLU passed it.
        // `out` and `dout` are the op's own result and its gradient, in its memory order; per
        // channel, the outputs add in the same order either way.
        let dh = with_slice(out, |out: &[T]| {
            with_slice(dout, |dout: &[T]| {
                let mut dh = vec![T::zero(); g.n * g.c * plane_in];
                match order {
                    Order::Nchw => dh
                        .par_chunks_mut(plane_in)
                        .zip(positions.par_chunks(plane_out))
                        .zip(out.par_chunks(plane_out).zip(dout.par_chunks(plane_out)))
                        .for_each(|((dh, at), (out, dout))| {
                            for ((&i, &o), &d) in at.iter().zip(out).zip(dout) {
                                if o > T::zero() {
                                    dh[i as usize] += d;
                                }
                            }
                        }),
                    // One image per task: `[OH·OW, C]` outputs into `[H·W, C]` inputs.
                    Order::Nhwc => dh
                        .par_chunks_mut(plane_in * g.c)
                        .zip(positions.par_chunks(plane_out * g.c))
                        .zip(out.par_chunks(plane_out * g.c).zip(dout.par_chunks(plane_out * g.c)))
                        .for_each(|((dh, at), (out, dout))| {
                            for ((at, out), dout) in
                                at.chunks_exact(g.c).zip(out.chunks_exact(g.c)).zip(dout.chunks_exact(g.c))
                            {
                                for (ch, ((&i, &o), &d)) in at.iter().zip(out).zip(dout).enumerate() {
                                    if o > T::zero() {
                                        dh[i as usize * g.c + ch] += d;
                                    }
                                }
                            }
                        }),
                }
                dh
            })
        })??;
        let need_dz = z.track_op();
        let (dz, dgamma, dbeta) = with_activation_in(z, order, |zs: &[T]| {
            with_slice(gamma, |gm: &[T]| self.bn.backward(zs, gm, &[], &dh, (g.n, g.c, plane_in), need_dz))
        })???;
        let dz = dz.map(|v| activation_from_vec(v, z.shape(), order, z.device())).transpose()?;
        Ok((dz, Some(Tensor::from_vec(dgamma, g.c, z.device())?), Some(Tensor::from_vec(dbeta, g.c, z.device())?)))
    }
}

impl CustomOp3 for BnReluMaxPool {
    fn name(&self) -> &'static str {
        "batch-norm-relu-max-pool"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = &self.pool;
        let shape = match self.bn.order() {
            Order::Nchw => Shape::from((g.n, g.c, g.oh, g.ow)),
            Order::Nhwc => Shape::from((g.n, g.oh, g.ow, g.c)),
        };
        let out = match s1 {
            CpuStorage::F32(_) => CpuStorage::F32(self.forward::<f32>(
                &self.input(s1, l1)?,
                &storage_slice(s2, l2)?,
                &storage_slice(s3, l3)?,
            )?),
            CpuStorage::F64(_) => CpuStorage::F64(self.forward::<f64>(
                &self.input(s1, l1)?,
                &storage_slice(s2, l2)?,
                &storage_slice(s3, l3)?,
            )?),
            CpuStorage::BF16(_) => CpuStorage::BF16(self.forward::<half::bf16>(
                &self.input(s1, l1)?,
                &storage_slice(s2, l2)?,
                &storage_slice(s3, l3)?,
            )?),
            s => candle_core::bail!("stem pool: unsupported dtype {:?}", s.dtype()),
        };
        Ok((out, shape))
    }

    fn bwd(
        &self,
        z: &Tensor,
        gamma: &Tensor,
        _beta: &Tensor,
        out: &Tensor,
        dout: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        match z.dtype() {
            DType::F32 => self.bwd_typed::<f32>(z, gamma, out, dout),
            DType::F64 => self.bwd_typed::<f64>(z, gamma, out, dout),
            DType::BF16 => self.bwd_typed::<half::bf16>(z, gamma, out, dout),
            d => candle_core::bail!("stem pool: unsupported dtype {d:?}"),
        }
    }
}

/// `relu(max_pool(h))` over an NHWC `h`, with the in-plane position (`y·W + x`) of each
/// output's maximum, both `[N, OH, OW, C]`. Per channel the same scan as [`argmax_planes`]
/// (row-major window order, strictly greater or NaN replaces), written as selects over a
/// pixel's channels so that it runs as vector compares.
fn pool_relu_nhwc<T: super::batch_norm_op::Act>(h: &[T], g: &Pool) -> (Vec<T>, Vec<u32>) {
    let c = g.c;
    let rows: Vec<_> = (0..g.oh).map(|o| g.window(o, g.h)).collect();
    let cols: Vec<_> = (0..g.ow).map(|o| g.window(o, g.w)).collect();
    let mut out = vec![T::zero(); g.n * g.oh * g.ow * c];
    let mut positions = vec![0u32; out.len()];
    // One output row of one image per task.
    out.par_chunks_mut(g.ow * c).zip(positions.par_chunks_mut(g.ow * c)).enumerate().for_each(|(task, (out, at))| {
        let (img, (y0, y1)) = (task / g.oh, rows[task % g.oh]);
        let image = &h[img * g.h * g.w * c..][..g.h * g.w * c];
        simd::run!({
            let mut best = vec![T::W::ZERO; c];
            for ((out, at), &(x0, x1)) in out.chunks_exact_mut(c).zip(at.chunks_exact_mut(c)).zip(&cols) {
                let first = y0 * g.w + x0;
                for (b, v) in best.iter_mut().zip(&image[first * c..][..c]) {
                    *b = v.lane();
                }
                at.fill(first as u32);
                for y in y0..y1 {
                    for x in x0..x1 {
                        let pos = y * g.w + x;
                        for ((b, a), v) in best.iter_mut().zip(at.iter_mut()).zip(&image[pos * c..][..c]) {
                            let v = v.lane();
                            // `|`, not `||`, and selects: branches kept the loop scalar.
                            #[allow(clippy::eq_op)] // `v != v`: NaN
                            let take = (v > *b) | (v != v);
                            *b = if take { v } else { *b };
                            *a = if take { pos as u32 } else { *a };
                        }
                    }
                }
                for (o, &b) in out.iter_mut().zip(&best) {
                    *o = T::from_lane(b.relu());
                }
            }
        })
    });
    (out, positions)
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Result, Tensor, Var};

    use crate::cpu_slice::Order;
    use crate::nn::batch_norm::batch_norm2d;
    use crate::nn::max_pool2d;
    use crate::nn::ParamBuilder;

    /// Against the composed path it replaces (fused BN + ReLU, then `max_pool2d`), bit for bit:
    /// values, running statistics, and the gradients of z, γ and β; with windows whose maxima
    /// are negative, zero and tied, an odd side (the padding's edge), NCHW and channels-last
    /// inputs (as a convolution leaves them), and three dtypes (bf16 with f32 parameters, as
    /// mixed precision has them).
    #[test]
    fn equals_bn_relu_then_max_pool_exactly() -> Result<()> {
        let dev = Device::Cpu;
        let cases = [
            (DType::F64, 9, Order::Nchw),
            (DType::F32, 8, Order::Nchw),
            (DType::F64, 9, Order::Nhwc),
            (DType::F32, 8, Order::Nhwc),
            (DType::BF16, 9, Order::Nhwc),
        ];
        for (dtype, side, order) in cases {
            let n = 3 * 4 * side * side;
            // Five levels (-0.5 to 1.5 in steps of 0.5) give many exact ties (a first-maximum
            // rule that took the last one fails here); the shift and a negative γ give windows
            // whose maxima are negative or zero.
            let vals: Vec<f64> = (0..n).map(|i| ((i * 7 % 13 / 3) as f64 - 1.0) / 2.0).collect();
            let z = Tensor::from_vec(vals, (3, 4, side, side), &dev)?.to_dtype(dtype)?;
            let z = match order {
                Order::Nchw => Var::from_tensor(&z)?,
                Order::Nhwc => {
                    Var::from_tensor(&z.permute((0, 2, 3, 1))?.contiguous()?.permuted_variable((0, 3, 1, 2))?)?
                }
            };
            let param_dtype = if dtype == DType::BF16 { DType::F32 } else { dtype };
            let pb = ParamBuilder::new(5, &dev, param_dtype);
            let (a, b) = (batch_norm2d(4, false, &pb.pp("a"))?, batch_norm2d(4, false, &pb.pp("b"))?);
            // The same non-trivial γ (one of them negative) and β for both.
            for p in pb.store().params {
                let v: &[f64] =
                    if p.name.ends_with("weight") { &[1.5, -0.5, 0.75, 2.0] } else { &[0.25, -1.0, 0.0, 0.5] };
                p.var.set(&Tensor::new(v, &dev)?.to_dtype(param_dtype)?)?;
            }

            let want = max_pool2d(&a.forward_relu_t(z.as_tensor(), true)?, 3, 2, 1)?;
            let op = b.fused_train_op(z.as_tensor())?.expect("CPU takes the fused op");
            let (gamma, beta) = b.affine(dtype)?;
            let got = super::BnReluMaxPool::new(op, z.as_tensor(), 3, 2, 1)?.apply(z.as_tensor(), &gamma, &beta)?;
            assert_eq!(Order::of(got.layout()), Some(order), "{dtype:?} {order:?}: the output keeps z's order");
            let same = |x: &Tensor, y: &Tensor| -> Result<bool> {
                Ok(x.dims() == y.dims()
                    && x.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?
                        == y.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?)
            };
            assert!(same(&got, &want)?, "{dtype:?} {order:?} output");
            assert!(same(a.running_mean(), b.running_mean())? && same(a.running_var(), b.running_var())?);

            let proj = Tensor::from_vec(
                (0..got.elem_count()).map(|i| (i % 5) as f64 - 1.5).collect::<Vec<_>>(),
                got.dims(),
                &dev,
            )?
            .to_dtype(dtype)?;
            let (gw, gg) = (want.mul(&proj)?.sum_all()?.backward()?, got.mul(&proj)?.sum_all()?.backward()?);
            let dz = gg.get(z.as_tensor()).expect("dz");
            assert_eq!(Order::of(dz.layout()), Some(order), "{dtype:?} {order:?}: dz keeps z's order");
            assert!(same(dz, gw.get(z.as_tensor()).expect("dz"))?, "{dtype:?} {order:?} dz");
            assert!(same(gg.get(b.weight()).expect("dγ"), gw.get(a.weight()).expect("dγ"))?, "{dtype:?} {order:?} dγ");
            assert!(same(gg.get(b.bias()).expect("dβ"), gw.get(a.bias()).expect("dβ"))?, "{dtype:?} {order:?} dβ");
        }
        Ok(())
    }

    /// `cargo test --release --lib nn::stem_pool_op -- --ignored --nocapture`: ResNet-50's bf16
    /// stem tail at 32 views (64 channels, 112² → 56², NHWC as the convolution leaves it).
    #[test]
    #[ignore]
    fn bench_nhwc_bf16() -> Result<()> {
        let dev = Device::Cpu;
        let (n, c, h) = (32, 64, 112);
        let v: Vec<f32> = (0..n * c * h * h).map(|i| ((i * 7919 % 1013) as f32 - 400.0) / 300.0).collect();
        let z = Tensor::from_vec(v, (n, h, h, c), &dev)?.to_dtype(DType::BF16)?;
        let z = Var::from_tensor(&z.permuted_variable((0, 3, 1, 2))?)?;
        let pb = ParamBuilder::new(5, &dev, DType::F32);
        let bn = batch_norm2d(c, false, &pb.pp("bn"))?;
        let (gamma, beta) = bn.affine(DType::BF16)?;
        let time = |name: &str, f: &dyn Fn() -> Result<()>| -> Result<()> {
            f()?;
            let t = std::time::Instant::now();
            for _ in 0..5 {
                f()?;
            }
            println!("{name}: {:.1} ms", t.elapsed().as_secs_f64() * 1e3 / 5.0);
            Ok(())
        };
        let op = || -> Result<super::BnReluMaxPool> {
            let bn = bn.fused_train_op(z.as_tensor())?.expect("CPU takes the fused op");
            super::BnReluMaxPool::new(bn, z.as_tensor(), 3, 2, 1)
        };
        time("forward", &|| op()?.apply(z.as_tensor(), &gamma, &beta).map(drop))?;
        time("forward + backward", &|| op()?.apply(z.as_tensor(), &gamma, &beta)?.sum_all()?.backward().map(drop))?;
        Ok(())
    }
}
