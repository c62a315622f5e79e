//! Cross-entropy of classifier logits against the batch's labels (supervised local learning).

use candle_core::{DType, Result, Tensor, D};

/// `−mean_i log softmax(logits_i)[label_i]`.
///
/// # Shapes
/// - `logits`: `[B, C]`, `labels`: `[B]` (integer classes below `C`) → scalar.
pub fn cross_entropy(logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
    let (b, c) = logits.dims2()?;
    if labels.dims() != [b] {
        candle_core::bail!("cross_entropy: {b} rows of logits but labels of shape {:?}", labels.dims());
    }
    let labels = labels.to_dtype(DType::U32)?;
    if let Some(&l) = labels.to_vec1::<u32>()?.iter().find(|&&l| l as usize >= c) {
        candle_core::bail!("cross_entropy: label {l} but only {c} logits per row");
    }
    let log_prob = candle_nn::ops::log_softmax(logits, D::Minus1)?;
    log_prob.gather(&labels.unsqueeze(1)?, 1)?.mean_all()?.neg()
}

/// [`cross_entropy`] as a graph node: inputs `logits` and `labels`.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct CrossEntropy;

impl crate::nn::Layer for CrossEntropy {
    fn forward_t(&self, _x: &Tensor, _train: bool) -> Result<Tensor> {
        candle_core::bail!("cross_entropy takes two inputs, `logits` and `labels`")
    }
    fn forward_inputs(&self, xs: &[Tensor], _train: bool) -> Result<Tensor> {
        match xs {
            [logits, labels] => cross_entropy(logits, labels),
            _ => candle_core::bail!("cross_entropy takes `logits` and `labels`, got {} inputs", xs.len()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Against the definition, and against PyTorch:
    /// ```python
    /// logits = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]]); labels = torch.tensor([1, 2])
    /// torch.nn.functional.cross_entropy(logits, labels)   # tensor(0.2651)
    /// ```
    #[test]
    fn matches_pytorch() -> Result<()> {
        let logits = Tensor::new(&[[1.0f32, 2.0, 0.5], [0.0, -1.0, 3.0]], &Device::Cpu)?;
        let labels = Tensor::new(&[1u32, 2], &Device::Cpu)?;
        let got = cross_entropy(&logits, &labels)?.to_scalar::<f32>()?;
        let lse = |r: [f32; 3]| r.iter().map(|v| v.exp()).sum::<f32>().ln();
        let want = ((lse([1.0, 2.0, 0.5]) - 2.0) + (lse([0.0, -1.0, 3.0]) - 3.0)) / 2.0;
        assert!((got - want).abs() < 1e-6 && (got - 0.2651).abs() < 1e-4, "{got} vs {want}");
        assert!(cross_entropy(&logits, &Tensor::new(&[1u32, 3], &Device::Cpu)?).is_err(), "label 3 of 3 classes");
        Ok(())
    }
}
