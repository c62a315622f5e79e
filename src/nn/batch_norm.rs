//! BatchNorm over NCHW with PyTorch's running-statistics rule.

use candle_core::{DType, Result, Tensor, Var, D};

use super::{Init, ParamBuilder, ParamKind};

/// `weight`/`bias` are learned (`ParamKind::Norm`: no weight decay, no LARS adaptation);
/// `running_mean`/`running_var` are buffers, updated in training mode and used in eval mode.
#[derive(Clone, Debug)]
pub struct BatchNorm2d {
    weight: Tensor,
    bias: Tensor,
    running_mean: Var,
    running_var: Var,
    eps: f64,
    momentum: f64,
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
        let c = self.weight.dim(0)?;
        let view = (1, c, 1, 1);
        let (mean, var) = if train {
            let (n, _, h, w) = x.dims4()?;
            let count = (n * h * w) as f64;
            if count < 2.0 {
                candle_core::bail!(
                    "batch norm in training mode needs more than one value per channel, got {:?}",
                    x.shape()
                );
            }
            // Reduce W then (N, H): candle reduces one contiguous axis fastest.
            let mean = (x.sum_keepdim(D::Minus1)?.sum_keepdim(2)?.sum_keepdim(0)? / count)?;
            let centred = x.broadcast_sub(&mean)?;
            let var = (centred.sqr()?.sum_keepdim(D::Minus1)?.sum_keepdim(2)?.sum_keepdim(0)? / count)?;
            // Running statistics never carry the graph (Var::set copies values only).
            let m = self.momentum;
            let new_mean = ((self.running_mean.as_tensor() * (1.0 - m))? + (mean.detach().flatten_all()? * m)?)?;
            let unbiased = (var.detach().flatten_all()? * (count / (count - 1.0)))?;
            let new_var = ((self.running_var.as_tensor() * (1.0 - m))? + (unbiased * m)?)?;
            self.running_mean.set(&new_mean.to_dtype(self.running_mean.dtype())?)?;
            self.running_var.set(&new_var.to_dtype(self.running_var.dtype())?)?;
            let inv_std = (var + self.eps)?.sqrt()?.recip()?;
            let scale = inv_std.broadcast_mul(&self.weight.reshape(view)?)?;
            return centred.broadcast_mul(&scale)?.broadcast_add(&self.bias.reshape(view)?);
        } else {
            (self.running_mean.as_detached_tensor(), self.running_var.as_detached_tensor())
        };
        // Eval mode folds everything into one scale and shift per channel.
        let inv_std = (var + self.eps)?.sqrt()?.recip()?;
        let scale = (inv_std * &self.weight)?;
        let shift = (&self.bias - (mean * &scale)?)?;
        let x = x.broadcast_mul(&scale.reshape(view)?)?;
        x.broadcast_add(&shift.reshape(view)?)
    }
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
}
