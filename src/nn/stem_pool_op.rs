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

use std::sync::{Arc, Mutex};

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::batch_norm_op::BatchNormTrain;
use super::pool::{argmax_planes, Pool};
use crate::cpu_slice::{storage_slice, with_slice};

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
    pub fn new(bn: BatchNormTrain, z: &Tensor, kernel: usize, stride: usize, padding: usize) -> Result<Self> {
        Ok(Self { bn: bn.with_relu(false), pool: Pool::new(z, kernel, stride, padding)?, positions: Mutex::new(None) })
    }

    fn forward<T: super::batch_norm_op::Act>(&self, z: &[T], gamma: &[T], beta: &[T]) -> Result<Vec<T>> {
        let g = &self.pool;
        let h = self.bn.forward(z, gamma, beta, g.c, g.h * g.w);
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
        *self.positions.lock().map_err(|_| candle_core::Error::Msg("stem pool lock poisoned".into()))? =
            Some(Arc::new(positions));
        Ok(out)
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
        // The gradient reaching bn(z): each output's, at its maximum, where the ReLU passed it.
        let dh = with_slice(out, |out: &[T]| {
            with_slice(dout, |dout: &[T]| {
                let mut dh = vec![T::zero(); g.n * g.c * plane_in];
                dh.par_chunks_mut(plane_in)
                    .zip(positions.par_chunks(plane_out))
                    .zip(out.par_chunks(plane_out).zip(dout.par_chunks(plane_out)))
                    .for_each(|((dh, at), (out, dout))| {
                        for ((&i, &o), &d) in at.iter().zip(out).zip(dout) {
                            if o > T::zero() {
                                dh[i as usize] += d;
                            }
                        }
                    });
                dh
            })
        })??;
        let need_dz = z.track_op();
        let (dz, dgamma, dbeta) = with_slice(z, |zs: &[T]| {
            with_slice(gamma, |gm: &[T]| self.bn.backward(zs, gm, &[], &dh, (g.n, g.c, plane_in), need_dz))
        })???;
        let dz = dz.map(|v| Tensor::from_vec(v, z.shape(), z.device())).transpose()?;
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
        let shape = Shape::from((g.n, g.c, g.oh, g.ow));
        let out = match s1 {
            CpuStorage::F32(_) => CpuStorage::F32(self.forward::<f32>(
                &storage_slice(s1, l1)?,
                &storage_slice(s2, l2)?,
                &storage_slice(s3, l3)?,
            )?),
            CpuStorage::F64(_) => CpuStorage::F64(self.forward::<f64>(
                &storage_slice(s1, l1)?,
                &storage_slice(s2, l2)?,
                &storage_slice(s3, l3)?,
            )?),
            CpuStorage::BF16(_) => CpuStorage::BF16(self.forward::<half::bf16>(
                &storage_slice(s1, l1)?,
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

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Result, Tensor, Var};

    use crate::nn::batch_norm::batch_norm2d;
    use crate::nn::max_pool2d;
    use crate::nn::ParamBuilder;

    /// Against the composed path it replaces (fused BN + ReLU, then `max_pool2d`), bit for bit:
    /// values, running statistics, and the gradients of z, γ and β; with windows whose maxima
    /// are negative, zero and tied, an odd side (the padding's edge) and two dtypes.
    #[test]
    fn equals_bn_relu_then_max_pool_exactly() -> Result<()> {
        let dev = Device::Cpu;
        for (dtype, side) in [(DType::F64, 9), (DType::F32, 8)] {
            let n = 3 * 4 * side * side;
            // Integer-valued steps give exact ties; the shift makes a third of them negative.
            let vals: Vec<f64> = (0..n).map(|i| ((i * 7 % 13) as f64 - 4.0) / 2.0).collect();
            let z = Var::from_tensor(&Tensor::from_vec(vals, (3, 4, side, side), &dev)?.to_dtype(dtype)?)?;
            let pb = ParamBuilder::new(5, &dev, dtype);
            let (a, b) = (batch_norm2d(4, false, &pb.pp("a"))?, batch_norm2d(4, false, &pb.pp("b"))?);
            // The same non-trivial γ (one of them negative) and β for both.
            for p in pb.store().params {
                let v: &[f64] =
                    if p.name.ends_with("weight") { &[1.5, -0.5, 0.75, 2.0] } else { &[0.25, -1.0, 0.0, 0.5] };
                p.var.set(&Tensor::new(v, &dev)?.to_dtype(dtype)?)?;
            }

            let want = max_pool2d(&a.forward_relu_t(z.as_tensor(), true)?, 3, 2, 1)?;
            let op = b.fused_train_op(z.as_tensor())?.expect("CPU takes the fused op");
            let got = z.as_tensor().apply_op3(
                b.weight(),
                b.bias(),
                super::BnReluMaxPool::new(op, z.as_tensor(), 3, 2, 1)?,
            )?;
            let same = |x: &Tensor, y: &Tensor| -> Result<bool> {
                Ok(x.dims() == y.dims()
                    && x.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?
                        == y.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?)
            };
            assert!(same(&got, &want)?, "{dtype:?} output");
            assert!(same(a.running_mean(), b.running_mean())? && same(a.running_var(), b.running_var())?);

            let proj = Tensor::from_vec(
                (0..got.elem_count()).map(|i| (i % 5) as f64 - 1.5).collect::<Vec<_>>(),
                got.shape(),
                &dev,
            )?
            .to_dtype(dtype)?;
            let (gw, gg) = (want.mul(&proj)?.sum_all()?.backward()?, got.mul(&proj)?.sum_all()?.backward()?);
            assert!(same(gg.get(z.as_tensor()).expect("dz"), gw.get(z.as_tensor()).expect("dz"))?, "{dtype:?} dz");
            assert!(same(gg.get(b.weight()).expect("dγ"), gw.get(a.weight()).expect("dγ"))?, "{dtype:?} dγ");
            assert!(same(gg.get(b.bias()).expect("dβ"), gw.get(a.bias()).expect("dβ"))?, "{dtype:?} dβ");
        }
        Ok(())
    }
}
