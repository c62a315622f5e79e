//! Mean squared error (InfoPro's reconstruction term).

use candle_core::{Result, Tensor};

/// `mean((prediction − target)²)` over every element.
///
/// # Shapes
/// - `prediction`, `target`: the same shape → scalar.
pub fn mse(prediction: &Tensor, target: &Tensor) -> Result<Tensor> {
    if prediction.dims() != target.dims() {
        candle_core::bail!("mse: prediction {:?} and target {:?} differ", prediction.dims(), target.dims());
    }
    (prediction - target)?.sqr()?.mean_all()
}

/// [`mse`] as a graph node: inputs `prediction` and `target`.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Mse;

impl crate::nn::Layer for Mse {
    fn forward_t(&self, _x: &Tensor, _train: bool) -> Result<Tensor> {
        candle_core::bail!("mse takes two inputs, `prediction` and `target`")
    }
    fn forward_inputs(&self, xs: &[Tensor], _train: bool) -> Result<Tensor> {
        match xs {
            [p, t] => mse(p, t),
            _ => candle_core::bail!("mse takes `prediction` and `target`, got {} inputs", xs.len()),
        }
    }
}
