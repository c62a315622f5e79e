//! Global average pooling on the CPU as one op that reads an activation in the order it lies
//! in memory, NCHW or channels-last.
//!
//! `x.mean((2, 3))` on a channels-last view walks it through candle's strided reduction, one
//! index computation per element, and sums bf16 in bf16. Its gradient is a broadcast
//! `[N, C, 1, 1] → [N, C, H, W]` view, which the next op on oneDNN's path gathers back into
//! channels-last. On the narrow ResNet-18's LoCo step in bf16 that was 6 % of the step, for an
//! op that reads each value once. Here the forward sums each image's pixels as contiguous
//! channel vectors (NHWC) or each contiguous plane (NCHW), in the type's lane arithmetic (f32
//! for f32 and bf16, f64 for f64). The backward writes `dy / (H·W)` to every pixel in the
//! input's order, a dense tensor that needs no copy downstream.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::act::{Act, Lane};
use crate::cpu_slice::{activation_from_vec, storage_activation, with_slice, Order};
use crate::simd;

/// `x.mean((2, 3))` of an `[N, C, H, W]` activation, as a candle op.
pub(crate) struct GlobalAvgPool;

/// `[N, C]` means of `x`'s planes, its elements lying in `order`.
fn forward<T: Act>(x: &[T], order: Order, (n, c, hw): (usize, usize, usize)) -> Vec<T> {
    let inv = T::W::of(1.0 / hw.max(1) as f64);
    let mut out = vec![T::zero(); n * c];
    match order {
        Order::Nhwc => out.par_chunks_mut(c.max(1)).zip(x.par_chunks((hw * c).max(1))).for_each(|(o, img)| {
            simd::run!({
                let mut acc = vec![T::W::ZERO; c];
                for pixel in img.chunks_exact(c) {
                    let acc = &mut acc[..pixel.len()];
                    for ch in 0..pixel.len() {
                        acc[ch] = acc[ch] + pixel[ch].lane();
                    }
                }
                for (o, a) in o.iter_mut().zip(acc) {
                    *o = T::from_lane(a * inv);
                }
            })
        }),
        Order::Nchw => out.par_iter_mut().zip(x.par_chunks(hw.max(1))).for_each(|(o, plane)| {
            *o = simd::run!({
                // Independent partial sums, so that the loop vectorises (one chain would add at
                // the add latency).
                const LANES: usize = 16;
                let mut acc = [T::W::ZERO; LANES];
                let chunks = plane.chunks_exact(LANES);
                let mut tail = T::W::ZERO;
                for v in chunks.remainder() {
                    tail = tail + v.lane();
                }
                for chunk in chunks {
                    for j in 0..LANES {
                        acc[j] = acc[j] + chunk[j].lane();
                    }
                }
                let mut total = tail;
                for a in acc {
                    total = total + a;
                }
                T::from_lane(total * inv)
            })
        }),
    }
    out
}

/// `dx` of the forward, `dy / (H·W)` at every pixel, laid out in `order`.
fn backward<T: Act>(dy: &[T], order: Order, (n, c, hw): (usize, usize, usize)) -> Vec<T> {
    let inv = T::W::of(1.0 / hw.max(1) as f64);
    let g: Vec<T> = dy.iter().map(|&v| T::from_lane(v.lane() * inv)).collect();
    let mut dx = vec![T::zero(); n * c * hw];
    match order {
        Order::Nhwc => dx.par_chunks_mut((hw * c).max(1)).zip(g.par_chunks(c.max(1))).for_each(|(img, g)| {
            for pixel in img.chunks_exact_mut(c) {
                pixel.copy_from_slice(g);
            }
        }),
        Order::Nchw => dx.par_chunks_mut(hw.max(1)).zip(g.par_iter()).for_each(|(plane, &g)| plane.fill(g)),
    }
    dx
}

impl CustomOp1 for GlobalAvgPool {
    fn name(&self) -> &'static str {
        "global-avg-pool"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (n, c, h, w) = l.shape().dims4()?;
        let dims = (n, c, h * w);
        let out = match s {
            CpuStorage::F32(_) => {
                let (x, order) = storage_activation::<f32>(s, l)?;
                CpuStorage::F32(forward(&x, order, dims))
            }
            CpuStorage::F64(_) => {
                let (x, order) = storage_activation::<f64>(s, l)?;
                CpuStorage::F64(forward(&x, order, dims))
            }
            CpuStorage::BF16(_) => {
                let (x, order) = storage_activation::<half::bf16>(s, l)?;
                CpuStorage::BF16(forward(&x, order, dims))
            }
            s => candle_core::bail!("global average pool: unsupported dtype {:?}", s.dtype()),
        };
        Ok((out, Shape::from((n, c))))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        let (n, c, h, w) = x.dims4()?;
        // The gradient goes out in the order the input lies in, dense, as the op that made `x`
        // reads it back; any other strided input was read as NCHW.
        let order = Order::of(x.layout()).unwrap_or(Order::Nchw);
        let dims = (n, c, h * w);
        let dx = match x.dtype() {
            DType::F32 => activation_from_vec(
                with_slice(dy, |g: &[f32]| backward(g, order, dims))?,
                x.shape(),
                order,
                x.device(),
            )?,
            DType::F64 => activation_from_vec(
                with_slice(dy, |g: &[f64]| backward(g, order, dims))?,
                x.shape(),
                order,
                x.device(),
            )?,
            DType::BF16 => activation_from_vec(
                with_slice(dy, |g: &[half::bf16]| backward(g, order, dims))?,
                x.shape(),
                order,
                x.device(),
            )?,
            d => candle_core::bail!("global average pool: unsupported dtype {d:?}"),
        };
        Ok(Some(dx))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Result, Tensor, Var};

    use crate::cpu_slice::Order;

    /// The op against `mean((2, 3))` and its candle gradient, in both memory orders and three
    /// dtypes, with an odd plane (7×5) and channel count (3) so that no loop divides evenly; the
    /// NHWC input's gradient comes back channels-last and dense.
    #[test]
    fn equals_mean_over_the_plane_in_both_orders() -> Result<()> {
        let dev = Device::Cpu;
        let (n, c, h, w) = (4, 3, 7, 5);
        let vals: Vec<f64> = (0..n * c * h * w).map(|i| ((i * 37 % 101) as f64 - 50.0) / 16.0).collect();
        let weights: Vec<f64> = (0..n * c).map(|i| (i as f64 - 5.0) / 4.0).collect();
        for (dtype, tol) in [(DType::F64, 1e-12), (DType::F32, 1e-5), (DType::BF16, 2e-2)] {
            let nchw = Tensor::from_vec(vals.clone(), (n, c, h, w), &dev)?.to_dtype(dtype)?;
            let wt = Tensor::from_vec(weights.clone(), (n, c), &dev)?.to_dtype(dtype)?;
            for order in [Order::Nchw, Order::Nhwc] {
                let x = match order {
                    Order::Nchw => Var::from_tensor(&nchw)?,
                    Order::Nhwc => {
                        crate::cpu_slice::leaf_copy(&nchw.permute((0, 2, 3, 1))?.contiguous()?.permute((0, 3, 1, 2))?)?
                    }
                };
                assert_eq!(Order::of(x.layout()), Some(order));
                // Reference in f64 from the same rounded values.
                let x64 = x.as_tensor().to_dtype(DType::F64)?;
                let want = x64.mean((2, 3))?;
                let want_dx =
                    (wt.to_dtype(DType::F64)? / (h * w) as f64)?.reshape((n, c, 1, 1))?.broadcast_as((n, c, h, w))?;

                let y = x.as_tensor().apply_op1(super::GlobalAvgPool)?;
                let grads = (&y * &wt)?.sum_all()?.backward()?;
                let dx = grads.get(x.as_tensor()).expect("x has a gradient");
                assert_eq!(Order::of(dx.layout()), Some(order), "{dtype:?} {order:?}: gradient order");
                let err = |a: &Tensor, b: &Tensor| -> Result<f64> {
                    (a.to_dtype(DType::F64)? - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f64>()
                };
                assert!(err(&y, &want)? <= tol, "{dtype:?} {order:?}: forward {}", err(&y, &want)?);
                assert!(err(dx, &want_dx)? <= tol, "{dtype:?} {order:?}: gradient {}", err(dx, &want_dx)?);
            }
        }
        Ok(())
    }
}
