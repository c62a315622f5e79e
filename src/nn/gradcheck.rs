//! Central finite-difference gradient checks, in f64.
//!
//! Every layer that wraps a candle trap keeps a gradient test on the wrapper (candle-notes:
//! `max_pool2d`'s backward is silently scaled by 1/k²). The check compares the gradient that
//! `backward()` gives with `(L(x + εeᵢ) − L(x − εeᵢ)) / 2ε` for every input element, where
//! `L = Σ f(x) ⊙ w` and `w` is a fixed, seeded Gaussian projection: a random `w` exercises every
//! output element with a different weight, so a gradient routed to the wrong output (or scaled
//! per element) cannot hide behind a symmetric sum.

use std::fmt;

use candle_core::{DType, Result, Tensor, Var};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};

/// Gradients smaller than this are compared absolutely (divided by this floor instead of by
/// their own size): exact zeros would otherwise turn 1e-12 of rounding noise into a 100% error.
pub const REL_ERR_FLOOR: f64 = 1e-3;

/// The outcome of [`gradcheck`].
#[derive(Clone, Debug)]
pub struct GradCheck {
    /// `max_i |a_i − n_i| / max(|a_i|, |n_i|, REL_ERR_FLOOR)`; `a` analytic, `n` numeric.
    pub max_rel_err: f64,
    /// `max_i |a_i − n_i|`.
    pub max_abs_err: f64,
    /// Flat index (row-major) of the input element with the largest relative error.
    pub worst: usize,
    /// Analytic and numeric gradient at `worst`.
    pub worst_analytic: f64,
    pub worst_numeric: f64,
    /// Number of input elements checked.
    pub checked: usize,
}

impl fmt::Display for GradCheck {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "max rel err {:.3e}, max abs err {:.3e} over {} elements (worst at {}: analytic {}, numeric {})",
            self.max_rel_err, self.max_abs_err, self.checked, self.worst, self.worst_analytic, self.worst_numeric
        )
    }
}

/// `Σ y ⊙ w` as an f64 scalar.
fn project(y: &Tensor, w: &Tensor) -> Result<Tensor> {
    y.mul(w)?.sum_all()
}

/// Checks the gradient of `f` at `x` against central finite differences with step `eps`.
///
/// `x` is converted to f64 and `f` must compute in f64 (an f32 `f` would drown the finite
/// differences in rounding error, so it is an error). `seed` fixes the projection `w`.
///
/// Piecewise-linear ops (max pooling) have kinks: keep the gaps between input values well above
/// `2·eps`, or the finite difference straddles a kink and the check fails for a good gradient.
/// For smooth ops `eps = 1e-5` balances truncation (`~eps²`) against rounding (`~1e-16/eps`).
///
/// # Shapes
/// - `x`: any shape; `f(x)`: any shape.
pub fn gradcheck<F>(f: F, x: &Tensor, eps: f64, seed: u64) -> Result<GradCheck>
where
    F: Fn(&Tensor) -> Result<Tensor>,
{
    if !(eps > 0.0 && eps.is_finite()) {
        candle_core::bail!("gradcheck: eps must be positive and finite, got {eps}")
    }
    let x = x.to_dtype(DType::F64)?.contiguous()?;
    let shape = x.shape().clone();
    let values = x.flatten_all()?.to_vec1::<f64>()?;

    // The analytic gradient, and the projection shaped like f(x).
    let var = Var::from_tensor(&x)?;
    let y = f(var.as_tensor())?;
    if y.dtype() != DType::F64 {
        candle_core::bail!("gradcheck: f must compute in f64, it returned {:?}", y.dtype())
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let w: Vec<f64> = (0..y.elem_count()).map(|_| StandardNormal.sample(&mut rng)).collect();
    let w = Tensor::from_vec(w, y.shape(), x.device())?;
    let grads = project(&y, &w)?.backward()?;
    let analytic = match grads.get(var.as_tensor()) {
        Some(g) => g.flatten_all()?.to_vec1::<f64>()?,
        // No path from x to the output: the analytic gradient is zero.
        None => vec![0.0; values.len()],
    };

    let loss_at = |v: Vec<f64>| -> Result<f64> {
        let xv = Tensor::from_vec(v, &shape, x.device())?;
        project(&f(&xv)?, &w)?.to_scalar::<f64>()
    };
    let mut report = GradCheck {
        max_rel_err: 0.0,
        max_abs_err: 0.0,
        worst: 0,
        worst_analytic: 0.0,
        worst_numeric: 0.0,
        checked: values.len(),
    };
    for (i, &a) in analytic.iter().enumerate() {
        let mut plus = values.clone();
        plus[i] += eps;
        let mut minus = values.clone();
        minus[i] -= eps;
        let numeric = (loss_at(plus)? - loss_at(minus)?) / (2.0 * eps);
        let abs = (a - numeric).abs();
        let rel = abs / a.abs().max(numeric.abs()).max(REL_ERR_FLOOR);
        report.max_abs_err = report.max_abs_err.max(abs);
        // A NaN gradient is recorded as the worst element, not skipped.
        if rel > report.max_rel_err || rel.is_nan() {
            report.max_rel_err = rel;
            report.worst = i;
            report.worst_analytic = a;
            report.worst_numeric = numeric;
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// A permutation of `0.01·k` (k < len), shifted: distinct values 0.01 apart, so a step of
    /// 1e-4 never reorders them.
    fn spaced(shape: &[usize]) -> Result<Tensor> {
        let len: usize = shape.iter().product();
        // 7919 is prime and does not divide the lengths used here: i ↦ 7919·i mod len permutes.
        let v: Vec<f64> = (0..len).map(|i| ((i * 7919) % len) as f64 * 0.01 - 0.5).collect();
        Tensor::from_vec(v, shape, &Device::Cpu)
    }

    #[test]
    fn passes_a_correct_smooth_gradient() -> Result<()> {
        let x = spaced(&[3, 5])?;
        let r = gradcheck(|x| x.sqr()?.sin()?.broadcast_mul(&x.exp()?), &x, 1e-5, 0)?;
        assert!(r.max_rel_err < 1e-8, "{r}");
        Ok(())
    }

    #[test]
    fn catches_a_deliberately_wrong_gradient() -> Result<()> {
        // d/dx (x·x) = 2x, but detaching one factor makes backward() report x.
        let x = spaced(&[4, 3])?;
        let r = gradcheck(|x| x.detach().mul(x), &x, 1e-5, 0)?;
        assert!((r.max_rel_err - 0.5).abs() < 1e-6, "{r}");
        Ok(())
    }

    /// The reason this module exists: candle's own 2×2 max-pool gradient is 1/4 of the truth.
    #[test]
    fn catches_candles_max_pool2d_backward() -> Result<()> {
        let x = spaced(&[2, 3, 6, 4])?;
        let r = gradcheck(|x| x.max_pool2d(2), &x, 1e-4, 0)?;
        // analytic 0.25·g against numeric g at every window maximum.
        assert!((r.max_rel_err - 0.75).abs() < 1e-6, "{r}");
        // And candle has no backward at all when kernel ≠ stride (trap 2).
        assert!(gradcheck(|x| x.max_pool2d_with_stride(3, 2), &x, 1e-4, 0).is_err());
        Ok(())
    }

    #[test]
    fn rejects_f32_functions() -> Result<()> {
        let x = spaced(&[4])?;
        assert!(gradcheck(|x| x.to_dtype(DType::F32), &x, 1e-5, 0).is_err());
        Ok(())
    }
}
