//! NT-Xent (temporary minimal version; the optim branch provides the tested one).

use candle_core::{DType, Result, Tensor, D};

/// # Shapes
/// `[2N, D]` → scalar. Rows `i` and `i + N` are the two views of one image.
pub fn nt_xent(z: &Tensor, temperature: f64) -> Result<Tensor> {
    let (n2, _) = z.dims2()?;
    let n = n2 / 2;
    let norm = (z.sqr()?.sum_keepdim(1)? + 1e-12)?.sqrt()?;
    let z = z.broadcast_div(&norm)?;
    let sim = (z.matmul(&z.t()?)? / temperature)?;
    let eye = Tensor::eye(n2, DType::F32, z.device())?;
    let sim = (sim - (eye * 1e9)?)?;
    let logp = candle_nn::ops::log_softmax(&sim, D::Minus1)?;
    let pos: Vec<f32> = (0..n2).flat_map(|i| (0..n2).map(move |j| if j == (i + n) % n2 { 1.0 } else { 0.0 })).collect();
    let pos = Tensor::from_vec(pos, (n2, n2), z.device())?;
    (logp * pos)?.sum_all()?.neg()? / n2 as f64
}
