//! Fully connected layer with PyTorch's default initialisation.

use candle_core::{Module, Result, Tensor};

use super::{Init, ParamBuilder, ParamKind};

#[derive(Clone, Debug)]
pub struct Linear {
    weight: Tensor,
    bias: Tensor,
}

/// `{path}.weight` `[out, in]` and `{path}.bias` `[out]`, U(±1/√in) like `torch.nn.Linear`.
pub fn linear(in_dim: usize, out_dim: usize, pb: &ParamBuilder) -> Result<Linear> {
    let init = Init::linear_default(in_dim);
    Ok(Linear {
        weight: pb.param("weight", (out_dim, in_dim), ParamKind::Weight, init)?,
        bias: pb.param("bias", out_dim, ParamKind::Bias, init)?,
    })
}

impl Linear {
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }
    pub fn bias(&self) -> &Tensor {
        &self.bias
    }
}

impl Module for Linear {
    /// # Shapes
    /// `[N, in]` → `[N, out]`.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        // Mixed precision: the f32 parameters are cast to the activations' type (no-op in f32).
        let (w, b) = (self.weight.to_dtype(x.dtype())?, self.bias.to_dtype(x.dtype())?);
        // `(w · xᵀ)ᵀ`, not `x · wᵀ`: the weight's gradient then comes out of the matmul's
        // backward as `gᵀ · x`, already `[out, in]`. With `wᵀ` in the product it comes out
        // `[in, out]` and is copied once more to the weight's layout, two weight-sized
        // tensors at once (134 MB for a 4096² head, the peak of a Progressive ResNet-50 GIM
        // step). The transposes left are of `[N, ·]` activations.
        w.matmul(&x.t()?)?.t()?.broadcast_add(&b)
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Module, Result, Tensor, Var};

    use super::linear;
    use crate::nn::ParamBuilder;

    /// Against the textbook `x·wᵀ + b` (PyTorch's `F.linear`): output and the gradients of
    /// `x`, `w` and `b`, and the weight's gradient comes out in the weight's own layout.
    #[test]
    fn linear_matches_x_wt_plus_b() -> Result<()> {
        let dev = Device::Cpu;
        let pb = ParamBuilder::new(7, &dev, DType::F64);
        let lin = linear(5, 3, &pb.pp("mlp0"))?;
        let vals: Vec<f64> = (0..20).map(|i| ((i * 7 % 11) as f64 - 5.0) / 4.0).collect();
        let x = Var::from_tensor(&Tensor::from_vec(vals, (4, 5), &dev)?)?;
        let proj = Tensor::from_vec((0..12).map(|i| (i as f64 - 5.5) / 3.0).collect::<Vec<_>>(), (4, 3), &dev)?;
        let got = lin.forward(x.as_tensor())?;
        let want = x.as_tensor().matmul(&lin.weight().t()?)?.broadcast_add(lin.bias())?;
        let diff =
            |a: &Tensor, b: &Tensor| -> Result<f64> { a.sub(b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f64>() };
        assert!(diff(&got, &want)? < 1e-12);
        let (g, w) = (got.mul(&proj)?.sum_all()?.backward()?, want.mul(&proj)?.sum_all()?.backward()?);
        for t in [x.as_tensor(), lin.weight(), lin.bias()] {
            let (a, b) = (g.get(t).expect("grad"), w.get(t).expect("grad"));
            assert_eq!(a.dims(), t.dims());
            assert!(diff(a, b)? < 1e-12, "{a} vs {b}");
        }
        assert!(g.get(lin.weight()).expect("grad").is_contiguous(), "no copy to the weight's layout needed");
        Ok(())
    }
}
