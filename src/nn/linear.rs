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
        x.matmul(&w.t()?)?.broadcast_add(&b)
    }
}
