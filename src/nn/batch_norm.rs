//! BatchNorm over NCHW with PyTorch's running-statistics rule.

use std::sync::atomic::{AtomicBool, Ordering};

use std::sync::Arc;

use candle_core::{DType, Result, Tensor, Var, D};

use super::batch_norm_op::{channel_stats_in, BatchNormTrain};
use super::{Init, ParamBuilder, ParamKind};
use crate::dist::{ops::all_reduce_sum, Communicator};

/// `weight`/`bias` are learned (`ParamKind::Norm`: no weight decay, no LARS adaptation);
/// `running_mean`/`running_var` are buffers, updated in training mode and used in eval mode.
///
/// Synchronised (built by a [`ParamBuilder::sync_batch_norm`] builder): in training mode the
/// statistics are those of the batch that all ranks of the group hold shares of, and so are the
/// backward's sums; outputs, `dx` and running statistics equal one process's on that batch, and
/// `dγ`, `dβ` are this rank's share of its gradients.
#[derive(Clone, Debug)]
pub struct BatchNorm2d {
    weight: Tensor,
    bias: Tensor,
    running_mean: Var,
    running_var: Var,
    eps: f64,
    momentum: f64,
    group: Option<Arc<dyn Communicator>>,
}

/// PyTorch defaults: eps 1e-5, momentum 0.1. `zero_init` sets γ = 0 (the last BN of a
/// residual branch, "zero-init residual", makes each block start as the identity).
pub fn batch_norm2d(channels: usize, zero_init: bool, pb: &ParamBuilder) -> Result<BatchNorm2d> {
    let gamma = if zero_init { 0.0 } else { 1.0 };
    Ok(BatchNorm2d {
        weight: pb.param("weight", channels, ParamKind::Norm, Init::Const(gamma))?,
        bias: pb.param("bias", channels, ParamKind::Norm, Init::Const(0.0))?,
        running_mean: pb.buffer("running_mean", channels, 0.0)?,
        running_var: pb.buffer("running_var", channels, 1.0)?,
        eps: 1e-5,
        momentum: 0.1,
        group: pb.batch_norm_group().cloned(),
    })
}

impl BatchNorm2d {
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }
    pub fn bias(&self) -> &Tensor {
        &self.bias
    }
    pub fn running_mean(&self) -> &Tensor {
        self.running_mean.as_tensor()
    }
    pub fn running_var(&self) -> &Tensor {
        self.running_var.as_tensor()
    }
    pub fn eps(&self) -> f64 {
        self.eps
    }

    /// # Shapes
    /// `[N, C, H, W]` → `[N, C, H, W]`.
    ///
    /// Training mode normalises with the batch statistics (biased variance) and updates the
    /// running statistics with the unbiased variance, exactly as `torch.nn.BatchNorm2d`.
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        self.forward_act_t(x, train, false)
    }

    /// `relu(forward_t(x))`, fused into the op where the op is (CPU training).
    pub fn forward_relu_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        self.forward_act_t(x, train, true)
    }

    fn forward_act_t(&self, x: &Tensor, train: bool, relu: bool) -> Result<Tensor> {
        if train {
            if let Some(op) = self.fused_train_op(x)? {
                let (gamma, beta) = self.affine(x.dtype())?;
                return op.with_relu(relu).apply(x, &gamma, &beta);
            }
        }
        if matches!(x.dtype(), DType::F16 | DType::BF16) {
            // Mixed precision: statistics and normalisation in f32 (a half-precision variance
            // loses the small per-channel differences), the result back in the compute type.
            return self.forward_act_t(&x.to_dtype(self.weight.dtype())?, train, relu)?.to_dtype(x.dtype());
        }
        if train {
            let y = self.train_composed(x)?;
            return if relu { y.relu() } else { Ok(y) };
        }
        let y = self.eval(x)?;
        if relu {
            y.relu()
        } else {
            Ok(y)
        }
    }

    fn eval(&self, x: &Tensor) -> Result<Tensor> {
        let c = self.weight.dim(0)?;
        let view = (1, c, 1, 1);
        let (mean, var) = (self.running_mean.as_detached_tensor(), self.running_var.as_detached_tensor());
        // Eval mode folds everything into one scale and shift per channel.
        let inv_std = (var + self.eps)?.sqrt()?.recip()?;
        let scale = (inv_std * &self.weight)?;
        let shift = (&self.bias - (mean * &scale)?)?;
        let x = x.broadcast_mul(&scale.reshape(view)?)?;
        x.broadcast_add(&shift.reshape(view)?)
    }
}

impl BatchNorm2d {
    /// The fused training op for `x` with the batch's statistics (and the running statistics
    /// updated), where it applies: CPU, f32/f64 like the weights or bf16 activations (statistics
    /// and arithmetic in f64 all the same), not the composed reference. For callers that apply
    /// the op their own way (`nn::Link::tail`, a block's tail), with [`Self::affine`]'s γ and β.
    pub fn fused_train_op(&self, x: &Tensor) -> Result<Option<BatchNormTrain>> {
        let fused = x.device().is_cpu()
            && (matches!(x.dtype(), DType::F32 | DType::F64) && x.dtype() == self.weight.dtype()
                || x.dtype() == DType::BF16)
            && !COMPOSED.load(Ordering::Relaxed);
        if fused {
            self.batch_op(x).map(Some)
        } else {
            Ok(None)
        }
    }

    /// γ and β in the activations' type (mixed precision: the f32 parameters cast on use, so
    /// their gradients come back to them in f32; no-op in f32).
    pub fn affine(&self, dtype: DType) -> Result<(Tensor, Tensor)> {
        Ok((self.weight.to_dtype(dtype)?, self.bias.to_dtype(dtype)?))
    }

    /// Training mode as one op ([`BatchNormTrain`]), CPU f32/f64; `relu` fuses a ReLU after
    /// (what `forward_t` runs in training; called directly by the tests).
    #[cfg(test)]
    pub(crate) fn train_fused(&self, x: &Tensor, relu: bool) -> Result<Tensor> {
        self.batch_op(x)?.with_relu(relu).apply(x, &self.weight, &self.bias)
    }

    /// The batch's statistics as the fused op; updates the running statistics.
    fn batch_op(&self, x: &Tensor) -> Result<BatchNormTrain> {
        let stats = channel_stats_in(x, self.group.as_ref())?;
        check_count(stats.count, x)?;
        let count = stats.count as f64;
        let c = stats.mean.len();
        // In the running statistics' type (f32 under mixed precision), not the activations'.
        let dt = self.running_mean.dtype();
        let mean = Tensor::from_slice(&stats.mean, c, x.device())?.to_dtype(dt)?;
        let var = Tensor::from_slice(&stats.var, c, x.device())?.to_dtype(dt)?;
        self.update_running(&mean, &(var * (count / (count - 1.0)))?)?;
        Ok(BatchNormTrain::new(&stats, self.eps).synced(self.group.clone()))
    }

    /// Training mode composed from candle ops (any device and dtype; the fused op's reference).
    pub(crate) fn train_composed(&self, x: &Tensor) -> Result<Tensor> {
        let (n, c, h, w) = x.dims4()?;
        let mut count = (n * h * w) as f64;
        // Synchronised: the per-channel sums are summed over the ranks by a differentiable
        // all-reduce, whose backward sums the ranks' cotangents.
        let global = |t: Tensor| match &self.group {
            Some(g) => all_reduce_sum(&t, g),
            None => Ok(t),
        };
        if let Some(g) = &self.group {
            let mut all = [count];
            g.all_reduce_sum(&mut all).map_err(candle_core::Error::wrap)?;
            count = all[0];
        }
        check_count(count as usize, x)?;
        let view = (1, c, 1, 1);
        // Reduce W then (N, H): candle reduces one contiguous axis fastest.
        let mean = (global(x.sum_keepdim(D::Minus1)?.sum_keepdim(2)?.sum_keepdim(0)?)? / count)?;
        let centred = x.broadcast_sub(&mean)?;
        let var = (global(centred.sqr()?.sum_keepdim(D::Minus1)?.sum_keepdim(2)?.sum_keepdim(0)?)? / count)?;
        let unbiased = (var.detach().flatten_all()? * (count / (count - 1.0)))?;
        self.update_running(&mean.detach().flatten_all()?, &unbiased)?;
        let inv_std = (var + self.eps)?.sqrt()?.recip()?;
        let scale = inv_std.broadcast_mul(&self.weight.reshape(view)?)?;
        centred.broadcast_mul(&scale)?.broadcast_add(&self.bias.reshape(view)?)
    }

    /// `running ← (1 − m)·running + m·batch` (unbiased variance), as PyTorch. Running statistics
    /// never carry the graph (`Var::set` copies values only).
    fn update_running(&self, mean: &Tensor, unbiased_var: &Tensor) -> Result<()> {
        let m = self.momentum;
        let dt = self.running_mean.dtype();
        let new_mean = ((self.running_mean.as_tensor() * (1.0 - m))? + (mean.to_dtype(dt)? * m)?)?;
        let new_var = ((self.running_var.as_tensor() * (1.0 - m))? + (unbiased_var.to_dtype(dt)? * m)?)?;
        self.running_mean.set(&new_mean)?;
        self.running_var.set(&new_var)
    }
}

fn check_count(count: usize, x: &Tensor) -> Result<()> {
    if count < 2 {
        candle_core::bail!("batch norm in training mode needs more than one value per channel, got {:?}", x.shape());
    }
    Ok(())
}

/// When set, training-mode batch norm is composed from candle ops (the reference the fused op
/// is tested against, and the "before" of benchmarks) instead of [`BatchNormTrain`].
static COMPOSED: AtomicBool = AtomicBool::new(false);

/// Routes training-mode batch norm to candle's composed ops (`true`) or the fused op (`false`,
/// the default). Process-wide.
pub fn use_composed_reference(on: bool) {
    COMPOSED.store(on, Ordering::Relaxed);
}

/// f32 statistics even for f16/bf16 activations would go here; for now all models are f32.
pub const STAT_DTYPE: DType = DType::F32;

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    // Reference (PyTorch 2.x):
    //   bn = torch.nn.BatchNorm2d(2); x = torch.arange(16.).reshape(2, 2, 2, 2) ** 1.5
    //   y = bn(x)   # training mode
    //   bn.running_mean -> 0.1 * batch mean, bn.running_var -> 0.9 + 0.1 * unbiased var
    // The same rule is written out below in plain f64.
    #[test]
    fn training_mode_matches_pytorch_rule() -> Result<()> {
        let pb = ParamBuilder::new(0, &Device::Cpu, DType::F64);
        let bn = batch_norm2d(2, false, &pb)?;
        let vals: Vec<f64> = (0..16).map(|i| (i as f64).powf(1.5)).collect();
        let x = Tensor::from_vec(vals.clone(), (2, 2, 2, 2), &Device::Cpu)?;
        let y = bn.forward_t(&x, true)?;
        for ch in 0..2 {
            let xs: Vec<f64> =
                (0..2).flat_map(|n| (0..4).map(move |k| (n, k))).map(|(n, k)| vals[n * 8 + ch * 4 + k]).collect();
            let mean = xs.iter().sum::<f64>() / 8.0;
            let var = xs.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / 8.0;
            let rm = bn.running_mean().to_vec1::<f64>()?[ch];
            let rv = bn.running_var().to_vec1::<f64>()?[ch];
            assert!((rm - 0.1 * mean).abs() < 1e-12);
            assert!((rv - (0.9 + 0.1 * var * 8.0 / 7.0)).abs() < 1e-12);
            let yv = y.flatten_all()?.to_vec1::<f64>()?;
            for n in 0..2 {
                for k in 0..4 {
                    let want = (vals[n * 8 + ch * 4 + k] - mean) / (var + 1e-5).sqrt();
                    assert!((yv[n * 8 + ch * 4 + k] - want).abs() < 1e-12);
                }
            }
        }
        // Eval mode uses the running statistics.
        let ye = bn.forward_t(&x, false)?.flatten_all()?.to_vec1::<f64>()?;
        let rm = bn.running_mean().to_vec1::<f64>()?;
        let rv = bn.running_var().to_vec1::<f64>()?;
        assert!((ye[0] - (vals[0] - rm[0]) / (rv[0] + 1e-5).sqrt()).abs() < 1e-12);
        Ok(())
    }

    /// The fused op against the composed candle ops (and candle's ReLU after them): output,
    /// running statistics and the gradients of x, γ and β under a random projection, odd sizes,
    /// f64 and f32.
    #[test]
    fn fused_matches_composed_ops() -> Result<()> {
        use crate::cpu_slice::Order;
        use candle_core::Var;
        use rand::SeedableRng;
        use rand_distr::{Distribution, StandardNormal};
        for (dtype, tol, relu, order) in [
            (DType::F64, 1e-10, false, Order::Nchw),
            (DType::F32, 1e-4, false, Order::Nchw),
            (DType::F64, 1e-10, true, Order::Nchw),
            (DType::F32, 1e-4, true, Order::Nchw),
            (DType::F64, 1e-10, false, Order::Nhwc),
            (DType::F32, 1e-4, true, Order::Nhwc),
            (DType::F64, 1e-10, true, Order::Nhwc),
        ] {
            // (2, 20, 11, 13): NHWC sums over two runs of pixels, in channel blocks of 8, 8 and 4.
            for &(n, c, h, w) in &[(3, 5, 7, 5), (2, 3, 1, 2), (4, 2, 9, 9), (2, 16, 3, 3), (2, 20, 11, 13)] {
                let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64((n * c * h * w) as u64);
                let mut randn = |shape: &[usize], scale: f64, shift: f64| -> Result<Tensor> {
                    let k: usize = shape.iter().product();
                    let v: Vec<f64> = (0..k)
                        .map(|_| {
                            shift
                                + scale * {
                                    let z: f64 = StandardNormal.sample(&mut rng);
                                    z
                                }
                        })
                        .collect();
                    Tensor::from_vec(v, shape, &Device::Cpu)?.to_dtype(dtype)
                };
                let x = randn(&[n, c, h, w], 3.0, 5.0)?;
                // NHWC: the same values as a channels-last leaf, as a convolution leaves them.
                let x = match order {
                    Order::Nchw => Var::from_tensor(&x)?,
                    Order::Nhwc => {
                        Var::from_tensor(&x.permute((0, 2, 3, 1))?.contiguous()?.permuted_variable((0, 3, 1, 2))?)?
                    }
                };
                let proj = randn(&[n, c, h, w], 1.0, 0.0)?;
                let (gamma, beta) = (randn(&[c], 0.5, 0.7)?, randn(&[c], 1.0, 0.0)?);
                let make = || -> Result<BatchNorm2d> {
                    Ok(BatchNorm2d {
                        weight: Var::from_tensor(&gamma)?.as_tensor().clone(),
                        bias: Var::from_tensor(&beta)?.as_tensor().clone(),
                        running_mean: Var::from_tensor(&Tensor::zeros(c, dtype, &Device::Cpu)?)?,
                        running_var: Var::from_tensor(&Tensor::ones(c, dtype, &Device::Cpu)?)?,
                        eps: 1e-5,
                        momentum: 0.1,
                        group: None,
                    })
                };
                let (fused, composed) = (make()?, make()?);
                let yf = fused.train_fused(x.as_tensor(), relu)?;
                let yc = composed.train_composed(x.as_tensor())?;
                let yc = if relu { yc.relu()? } else { yc };
                if c > 1 && h * w > 1 {
                    assert_eq!(Order::of(yf.layout()), Some(order), "the output keeps the input's order");
                }
                let close = |a: &Tensor, b: &Tensor| -> Result<f64> {
                    let d = a.sub(b)?.abs()?.max_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?;
                    let s = b.abs()?.max_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?;
                    Ok(d / s.max(1e-30))
                };
                let gf = yf.mul(&proj)?.sum_all()?.backward()?;
                let gc = yc.mul(&proj)?.sum_all()?.backward()?;
                let errs = [
                    close(&yf, &yc)?,
                    close(fused.running_mean(), composed.running_mean())?,
                    close(fused.running_var(), composed.running_var())?,
                    close(gf.get(x.as_tensor()).expect("dx"), gc.get(x.as_tensor()).expect("dx"))?,
                    close(gf.get(&fused.weight).expect("dγ"), gc.get(&composed.weight).expect("dγ"))?,
                    close(gf.get(&fused.bias).expect("dβ"), gc.get(&composed.bias).expect("dβ"))?,
                ];
                assert!(
                    errs.iter().all(|e| *e < tol),
                    "{dtype:?} relu {relu} {order:?} {:?}: y/rm/rv/dx/dγ/dβ {errs:?}",
                    (n, c, h, w)
                );
            }
        }
        Ok(())
    }

    /// Mixed precision on CPU: bf16 activations through the fused op, f32 parameters cast on use,
    /// against the f32 op on the same (bf16-rounded) values. The statistics are computed in f64
    /// from the same values, so the running statistics agree to f32 rounding; outputs and
    /// gradients to bf16's rounding (2⁻⁸ relative; 1 % of the largest element).
    #[test]
    fn bf16_activations_track_f32() -> Result<()> {
        use candle_core::Var;
        let dev = Device::Cpu;
        for relu in [false, true] {
            let (n, c, h, w) = (4, 3, 5, 7);
            let v: Vec<f32> = (0..n * c * h * w).map(|i| ((i * 37 % 101) as f32 / 13.0).sin() * 3.0 + 1.5).collect();
            let x16 = Var::from_tensor(&Tensor::from_vec(v, (n, c, h, w), &dev)?.to_dtype(DType::BF16)?)?;
            let x32 = Var::from_tensor(&x16.to_dtype(DType::F32)?)?;
            let proj = Tensor::from_vec(
                (0..n * c * h * w).map(|i| (i % 7) as f32 - 3.0).collect::<Vec<_>>(),
                (n, c, h, w),
                &dev,
            )?;
            let pb = ParamBuilder::new(3, &dev, DType::F32);
            let (b16, b32) = (batch_norm2d(c, false, &pb.pp("a"))?, batch_norm2d(c, false, &pb.pp("b"))?);
            let y16 =
                if relu { b16.forward_relu_t(x16.as_tensor(), true)? } else { b16.forward_t(x16.as_tensor(), true)? };
            let y32 =
                if relu { b32.forward_relu_t(x32.as_tensor(), true)? } else { b32.forward_t(x32.as_tensor(), true)? };
            assert_eq!(y16.dtype(), DType::BF16);
            let g16 = y16.to_dtype(DType::F32)?.mul(&proj)?.sum_all()?.backward()?;
            let g32 = y32.mul(&proj)?.sum_all()?.backward()?;
            let close = |a: &Tensor, b: &Tensor| -> Result<f64> {
                let a = a.to_dtype(DType::F32)?;
                let d = a.sub(b)?.abs()?.max_all()?.to_scalar::<f32>()?;
                Ok((d / b.abs()?.max_all()?.to_scalar::<f32>()?.max(1e-30)) as f64)
            };
            assert!(close(b16.running_mean(), b32.running_mean())? < 1e-6, "relu {relu}: running mean");
            assert!(close(b16.running_var(), b32.running_var())? < 1e-6, "relu {relu}: running var");
            let errs = [
                close(&y16, &y32)?,
                close(g16.get(x16.as_tensor()).expect("dx"), g32.get(x32.as_tensor()).expect("dx"))?,
                close(g16.get(&b16.weight).expect("dγ"), g32.get(&b32.weight).expect("dγ"))?,
                close(g16.get(&b16.bias).expect("dβ"), g32.get(&b32.bias).expect("dβ"))?,
            ];
            assert!(errs.iter().all(|e| *e < 1e-2), "relu {relu}: y/dx/dγ/dβ {errs:?}");
            // The parameters' gradients reach the f32 parameters in f32.
            assert_eq!(g16.get(&b16.weight).expect("dγ").dtype(), DType::F32);
        }
        Ok(())
    }

    /// Finite differences through the fused op (the statistics depend on x: a wrong backward
    /// that treats them as constants is off by O(1)).
    #[test]
    fn fused_gradcheck_f64() -> Result<()> {
        let pb = ParamBuilder::new(0, &Device::Cpu, DType::F64);
        let bn = batch_norm2d(3, false, &pb)?;
        let v: Vec<f64> = (0..120).map(|i| ((i * 37 % 101) as f64 / 17.0).sin() * 2.0 + 1.0).collect();
        let x = Tensor::from_vec(v, (2, 3, 4, 5), &Device::Cpu)?;
        for relu in [false, true] {
            let r = crate::nn::gradcheck::gradcheck(|x| bn.train_fused(x, relu), &x, 1e-6, 3)?;
            assert!(r.max_rel_err < 1e-5, "relu {relu}: {r}");
        }
        Ok(())
    }

    /// A block tail's one pass (`relu(bn(z) + shortcut)`, `batch_norm_op::tail_forward`) against
    /// the batch norm's output then candle's add and ReLU, bit for bit: NCHW and NHWC, f32 and
    /// bf16, on a map of many parallel tasks (the shortcut read at each task's offset).
    #[test]
    fn tail_pass_equals_batch_norm_then_add_relu() -> Result<()> {
        use crate::cpu_slice::Order;
        use crate::nn::batch_norm_op::{channel_stats, tail_forward, BatchNormTrain};
        let (n, c, h, w) = (3, 20, 33, 35);
        let vals =
            |k: usize| -> Vec<f64> { (0..n * c * h * w).map(|i| ((i * k % 101) as f64 - 50.0) / 17.0).collect() };
        for dtype in [DType::F32, DType::BF16] {
            for order in [Order::Nchw, Order::Nhwc] {
                let t = |k| -> Result<Tensor> {
                    let t = Tensor::from_vec(vals(k), (n, c, h, w), &Device::Cpu)?.to_dtype(dtype)?;
                    match order {
                        Order::Nchw => Ok(t),
                        Order::Nhwc => t.permute((0, 2, 3, 1))?.contiguous()?.permute((0, 3, 1, 2)),
                    }
                };
                let (z, shortcut) = (t(7)?, t(13)?);
                let gamma = Tensor::from_vec((0..c).map(|i| 0.5 + i as f64 / 7.0).collect(), c, &Device::Cpu)?
                    .to_dtype(dtype)?;
                let beta = Tensor::from_vec((0..c).map(|i| i as f64 / 5.0 - 2.0).collect(), c, &Device::Cpu)?
                    .to_dtype(dtype)?;
                let op = BatchNormTrain::new(&channel_stats(&z)?, 1e-5).for_input(&z);
                let got = tail_forward(&op, &z, &gamma, &beta, &shortcut)?;
                let want = (op.apply(&z, &gamma, &beta)? + &shortcut)?.relu()?;
                let bits = |t: &Tensor| -> Result<Vec<u64>> {
                    Ok(t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?.into_iter().map(f64::to_bits).collect())
                };
                assert!(bits(got.as_tensor())? == bits(&want)?, "{dtype:?} {order:?}");
            }
        }
        Ok(())
    }

    /// One process's NHWC statistics (one pass, sums shifted by the first pixel) against the
    /// two-pass statistics of the same values NCHW, where a plain `Σx²/n − mean²` would cancel:
    /// a mean of 1000 and a standard deviation of 0.01 (f64: about 10 significant digits would
    /// be lost), and a first pixel 100 σ off the mean, in f64 and f32, over three runs of pixels.
    #[test]
    fn one_pass_statistics_match_two_passes() -> Result<()> {
        use crate::cpu_slice::Order;
        use crate::nn::batch_norm_op::channel_stats;
        use rand::SeedableRng;
        use rand_distr::{Distribution, StandardNormal};
        let (n, c, h, w) = (3, 5, 40, 41);
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
        let mut v: Vec<f64> = (0..n * c * h * w)
            .map(|_| {
                let z: f64 = StandardNormal.sample(&mut rng);
                1000.0 + 0.01 * z
            })
            .collect();
        v[0] = 1001.0; // channel 0's first pixel (NCHW index 0)
        for dtype in [DType::F64, DType::F32] {
            let x = Tensor::from_vec(v.clone(), (n, c, h, w), &Device::Cpu)?.to_dtype(dtype)?;
            let nhwc = x.permute((0, 2, 3, 1))?.contiguous()?.permute((0, 3, 1, 2))?;
            assert_eq!(Order::of(nhwc.layout()), Some(Order::Nhwc));
            let (one, two) = (channel_stats(&nhwc)?, channel_stats(&x)?);
            assert_eq!(one.count, two.count);
            for ch in 0..c {
                let dm = (one.mean[ch] - two.mean[ch]).abs() / two.mean[ch];
                let dv = (one.var[ch] - two.var[ch]).abs() / two.var[ch];
                assert!(dm < 1e-14 && dv < 1e-9, "{dtype:?} channel {ch}: mean {dm:.1e}, var {dv:.1e} apart");
            }
        }
        Ok(())
    }

    /// `cargo test --release --lib nn::batch_norm -- --ignored --nocapture`: one training-mode
    /// batch norm + ReLU on ResNet-50's first-stage shape (32 views, 256 channels, 56², NHWC
    /// bf16, as a convolution leaves it): statistics, forward, backward.
    #[test]
    #[ignore]
    fn bench_nhwc_bf16() -> Result<()> {
        use crate::cpu_slice::with_activation;
        use crate::nn::batch_norm_op::{channel_stats, BatchNormTrain};
        let (n, c, h, w) = (32, 256, 56, 56);
        let v: Vec<f32> = (0..n * c * h * w).map(|i| ((i * 7919 % 1013) as f32 - 400.0) / 300.0).collect();
        let x = Tensor::from_vec(v, (n, h, w, c), &Device::Cpu)?.to_dtype(DType::BF16)?;
        let x = Var::from_tensor(&x.permuted_variable((0, 3, 1, 2))?)?;
        let (gamma, beta) = (Tensor::ones(c, DType::BF16, &Device::Cpu)?, Tensor::zeros(c, DType::BF16, &Device::Cpu)?);
        let time = |name: &str, f: &dyn Fn() -> Result<()>| -> Result<()> {
            f()?;
            let t = std::time::Instant::now();
            for _ in 0..10 {
                f()?;
            }
            println!("{name}: {:.2} ms", t.elapsed().as_secs_f64() * 1e3 / 10.0);
            Ok(())
        };
        let stats = channel_stats(x.as_tensor())?;
        let op = || BatchNormTrain::new(&stats, 1e-5).with_relu(true);
        let y = op().apply(x.as_tensor(), &gamma, &beta)?;
        time("statistics", &|| channel_stats(x.as_tensor()).map(drop))?;
        time("forward", &|| op().apply(x.as_tensor(), &gamma, &beta).map(drop))?;
        let op = op().for_input(x.as_tensor());
        with_activation(x.as_tensor(), |xs: &[half::bf16], _| {
            with_activation(&y, |ys: &[half::bf16], _| {
                let g = vec![half::bf16::ONE; c];
                time("backward, sums only", &|| op.backward(xs, &g, ys, ys, (n, c, h * w), false).map(drop))?;
                time("backward", &|| op.backward(xs, &g, ys, ys, (n, c, h * w), true).map(drop))
            })?
        })??;
        Ok(())
    }
}
