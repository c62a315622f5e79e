//! SimSiam's and BYOL's loss: each view's prediction against the other view's target.

use candle_core::{Result, Tensor};

/// `x / max(‖x‖, 1e-12)` per row, as `torch.nn.functional.normalize`.
fn normalize(x: &Tensor) -> Result<Tensor> {
    x.broadcast_div(&x.sqr()?.sum_keepdim(1)?.sqrt()?.maximum(1e-12)?)
}

/// `−½ (mean_i cos(p₁ᵢ, z₂ᵢ) + mean_i cos(p₂ᵢ, z₁ᵢ))` where rows `0..N` are view 1 and `N..2N`
/// view 2 of the same images (the stacked views of a pair batch).
///
/// # Shapes
/// - `prediction`, `target`: `[2N, D]` → scalar.
pub fn neg_cosine(prediction: &Tensor, target: &Tensor) -> Result<Tensor> {
    let (rows, _) = prediction.dims2()?;
    if prediction.dims() != target.dims() || rows % 2 != 0 {
        candle_core::bail!(
            "neg_cosine: prediction {:?} and target {:?} must be the same [2N, D]",
            prediction.dims(),
            target.dims()
        );
    }
    let n = rows / 2;
    let z = normalize(target)?;
    // The other view's target for every row.
    let swapped = Tensor::cat(&[z.narrow(0, n, n)?, z.narrow(0, 0, n)?], 0)?;
    (normalize(prediction)? * swapped)?.sum(1)?.mean_all()?.neg()
}

/// [`neg_cosine`] as a graph node: inputs `prediction` and `target`.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct NegCosine;

impl crate::nn::Layer for NegCosine {
    fn forward_t(&self, _x: &Tensor, _train: bool) -> Result<Tensor> {
        candle_core::bail!("neg_cosine takes two inputs, `prediction` and `target`")
    }
    fn forward_inputs(&self, xs: &[Tensor], _train: bool) -> Result<Tensor> {
        match xs {
            [p, z] => neg_cosine(p, z),
            _ => candle_core::bail!("neg_cosine takes `prediction` and `target`, got {} inputs", xs.len()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// Against a naive f64 loop, in value and gradient (finite differences):
    /// ```python
    /// def loss(p, z):  # SimSiam, symmetrised
    ///     n = len(p) // 2
    ///     D = lambda a, b: -F.cosine_similarity(a, b.detach(), dim=-1).mean()
    ///     return 0.5 * D(p[:n], z[n:]) + 0.5 * D(p[n:], z[:n])
    /// ```
    #[test]
    fn matches_the_naive_symmetrised_cosine() -> Result<()> {
        let dev = Device::Cpu;
        let vals: Vec<f64> = (0..24).map(|i| ((i * 7 % 11) as f64 - 5.0) / 3.0).collect();
        let p = Var::from_tensor(&Tensor::from_vec(vals.clone(), (4, 6), &dev)?)?;
        let z = Tensor::from_vec(vals.iter().map(|v| v * v - 1.0).collect::<Vec<_>>(), (4, 6), &dev)?;
        let naive = |p: &[f64]| -> f64 {
            let row = |m: &[f64], i: usize| m[i * 6..i * 6 + 6].to_vec();
            let zs = z.flatten_all().and_then(|t| t.to_vec1::<f64>()).unwrap_or_default();
            let cos = |a: Vec<f64>, b: Vec<f64>| {
                let dot: f64 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
                dot / (a.iter().map(|x| x * x).sum::<f64>().sqrt() * b.iter().map(|x| x * x).sum::<f64>().sqrt())
            };
            let c12 = (cos(row(p, 0), row(&zs, 2)) + cos(row(p, 1), row(&zs, 3))) / 2.0;
            let c21 = (cos(row(p, 2), row(&zs, 0)) + cos(row(p, 3), row(&zs, 1))) / 2.0;
            -0.5 * (c12 + c21)
        };
        let loss = neg_cosine(p.as_tensor(), &z)?;
        assert!((loss.to_scalar::<f64>()? - naive(&vals)).abs() < 1e-12);
        let g = loss.backward()?.get(p.as_tensor()).expect("grad").flatten_all()?.to_vec1::<f64>()?;
        for (i, gi) in g.iter().enumerate() {
            let (mut up, mut down) = (vals.clone(), vals.clone());
            up[i] += 1e-6;
            down[i] -= 1e-6;
            let fd = (naive(&up) - naive(&down)) / 2e-6;
            assert!((gi - fd).abs() < 1e-7, "d/dp[{i}]: {gi} vs {fd}");
        }
        Ok(())
    }
}
