//! NT-Xent, SimCLR's normalised-temperature cross-entropy.
//!
//! For 2N projections (two views of N images) each row's positive is its pair and its
//! negatives are the other 2N−2 rows. Built from differentiable ops only: the fused
//! `softmax_last_dim` has no gradient in candle (candle-notes trap 4), so this uses
//! `candle_nn::ops::log_softmax`, which is an explicit max-subtracted logsumexp.
//!
//! Across ranks ([`nt_xent_in`]) each rank holds a share of the batch; with global negatives its
//! anchors are contrasted with every rank's rows (all-gathered), so loss and gradients are one
//! process's on the whole batch.

use std::sync::Arc;

use candle_core::{bail, DType, Device, Result, Tensor, D};
use serde::{Deserialize, Serialize};

use crate::dist::{ops::all_gather_views, Communicator};

/// Where an anchor's negatives come from when the batch is spread over ranks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Negatives {
    /// Every other row of the global batch, all ranks' (SimCLR's "global" contrastive loss):
    /// the loss one process computes on the whole batch.
    #[default]
    Global,
    /// Only the rows of the anchor's own rank: 2·n_r − 2 negatives instead of 2N − 2, no
    /// embeddings exchanged (what each GPU of a plain data-parallel SimCLR computes).
    Local,
}

/// `F.normalize`'s eps: rows with a smaller norm are divided by this instead, so an all-zero
/// row gives a finite loss and gradient.
const NORM_EPS: f64 = 1e-12;

/// The NT-Xent loss (SimCLR), averaged over all 2N anchors.
///
/// Rows are L2-normalised here; the logits are cosine similarities divided by `temperature`,
/// and each anchor's cross-entropy runs over the 2N−1 other rows (its self-similarity is
/// removed, not masked with a large constant, so the value is exact in any precision).
///
/// # Shapes
/// - `z`: `[2N, D]`, rows `0..N` are view 1 and rows `N..2N` view 2; row `i`'s positive is
///   row `(i + N) mod 2N`. N = 1 is allowed (the loss is then exactly 0: no negatives).
/// - returns a scalar `[]`, in `z`'s dtype for f32/f64 and in f32 for half precision
///   (the softmax over thousands of logits is not accurate enough in f16/bf16).
pub fn nt_xent(z: &Tensor, temperature: f64) -> Result<Tensor> {
    let (logits, positive) = logits_without_self(z, temperature)?;
    let log_prob = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
    log_prob.gather(&positive, 1)?.mean_all()?.neg()
}

/// [`nt_xent`] as a graph node (`op: nt_xent`); it has no parameters and no training mode.
/// In a group of several ranks it is [`nt_xent_in`] with the node's `negatives`.
#[derive(Clone, Debug)]
pub struct NtXent {
    pub temperature: f64,
    pub negatives: Negatives,
    /// The ranks that hold the batch's shares (one process: [`crate::dist::solo`]).
    pub group: Arc<dyn Communicator>,
}

impl NtXent {
    /// The loss of one process.
    pub fn new(temperature: f64) -> Self {
        NtXent { temperature, negatives: Negatives::Global, group: crate::dist::solo() }
    }

    /// The loss across `group`'s ranks with `negatives`.
    pub fn in_group(mut self, negatives: Negatives, group: Arc<dyn Communicator>) -> Self {
        self.negatives = negatives;
        self.group = group;
        self
    }
}

impl crate::nn::Layer for NtXent {
    /// # Shapes
    /// `[2·n_r, D]` → scalar.
    fn forward_t(&self, z: &Tensor, _train: bool) -> Result<Tensor> {
        nt_xent_in(z, self.temperature, self.negatives, &self.group)
    }
}

/// NT-Xent on a batch of which this rank holds the share `z` (`[2·n_r, D]`: view 1 of its
/// `n_r` images, then view 2, as [`nt_xent`]), the ranks' shares being consecutive images of the
/// global batch of `N = Σ n_r` images in rank order.
///
/// The value returned is the loss of the whole batch, the same on every rank (mean over its 2N
/// anchors; with [`Negatives::Local`], each anchor's negatives are its own rank's rows). Its
/// gradient is `size × this rank's anchors' share` of that loss's gradient: the mean over the
/// ranks of each parameter's gradient (what the gradient reducer computes) is then the whole
/// batch's gradient, with uneven shares too. With global negatives the backward also returns the
/// gradient of the rows other ranks gathered from this one (`dist::ops::all_gather_views`).
///
/// One rank: exactly [`nt_xent`].
///
/// # Shapes
/// - `z`: `[2·n_r, D]`
/// - returns a scalar `[]` (dtype as [`nt_xent`]).
pub fn nt_xent_in(z: &Tensor, temperature: f64, negatives: Negatives, group: &Arc<dyn Communicator>) -> Result<Tensor> {
    if group.size() == 1 {
        return nt_xent(z, temperature);
    }
    let (rows, _dim) = z.dims2()?;
    if rows < 2 || rows % 2 != 0 {
        bail!("nt_xent: expected [2n, D] with n >= 1 (two views per image), got {:?}", z.shape());
    }
    check_temperature(temperature)?;
    let z = match z.dtype() {
        DType::F16 | DType::BF16 => z.to_dtype(DType::F32)?,
        _ => z.clone(),
    };
    let unit = unit_rows(&z)?;
    let n_local = rows / 2;
    // Σ over this rank's anchors of −log p(positive); N, the global image count.
    let (anchor_sum, n_global) = match negatives {
        Negatives::Global => {
            let (all, counts) = all_gather_views(&unit, 2, group)?;
            let n: usize = counts.iter().sum();
            let off: usize = counts[..group.rank()].iter().sum();
            // This rank's anchors are global rows off..off+n_r and N+off..N+off+n_r.
            let global_row = |i: usize| if i < n_local { off + i } else { n + off + i - n_local };
            let logits = (unit.matmul(&all.t()?)? / temperature)?;
            let (others, positive) = anchor_indices(rows, 2 * n, global_row, z.device())?;
            let log_prob = candle_nn::ops::log_softmax(&logits.gather(&others, 1)?, D::Minus1)?;
            (log_prob.gather(&positive, 1)?.sum_all()?.neg()?, n)
        }
        Negatives::Local => {
            let counts = group.all_gather_counts(n_local).map_err(candle_core::Error::wrap)?;
            (nt_xent(&z, temperature)?.affine(rows as f64, 0.0)?, counts.iter().sum())
        }
    };
    let share = anchor_sum.affine(group.size() as f64 / (2 * n_global) as f64, 0.0)?;
    // The value of the whole batch's loss on every rank (logs, and the same finite/non-finite
    // verdict everywhere), the gradient of this rank's share.
    let mine = share.to_dtype(DType::F64)?.to_scalar::<f64>()?;
    let mut total = [mine];
    group.all_reduce_sum(&mut total).map_err(candle_core::Error::wrap)?;
    share.affine(1.0, total[0] / group.size() as f64 - mine)
}

/// Contrastive top-1 accuracy: the fraction of the 2N anchors whose positive has the highest
/// similarity among the 2N−1 other rows. For logging only (no gradient is recorded); the
/// temperature does not change the ranking, so it is not an argument.
///
/// # Shapes
/// - `z`: `[2N, D]`, laid out as for [`nt_xent`].
pub fn contrastive_accuracy(z: &Tensor) -> Result<f32> {
    let (logits, positive) = logits_without_self(&z.detach(), 1.0)?;
    let best = logits.argmax(D::Minus1)?;
    best.eq(&positive.squeeze(1)?)?.to_dtype(DType::F32)?.mean_all()?.to_scalar::<f32>()
}

/// Cosine similarity / τ of every row with every *other* row, and where each row's positive
/// sits among those columns.
///
/// # Shapes
/// - `z`: `[2N, D]`
/// - returns `([2N, 2N−1] logits, [2N, 1] u32 column of the positive)`
fn logits_without_self(z: &Tensor, temperature: f64) -> Result<(Tensor, Tensor)> {
    let (rows, _dim) = z.dims2()?;
    if rows < 2 || rows % 2 != 0 {
        bail!("nt_xent: expected [2N, D] with N >= 1 (two views per image), got {:?}", z.shape());
    }
    check_temperature(temperature)?;
    let z = match z.dtype() {
        DType::F16 | DType::BF16 => z.to_dtype(DType::F32)?,
        _ => z.clone(),
    };
    let unit = unit_rows(&z)?;
    let logits = (unit.matmul(&unit.t()?)? / temperature)?;
    let (others, positive) = anchor_indices(rows, rows, |i| i, z.device())?;
    Ok((logits.gather(&others, 1)?, positive))
}

fn check_temperature(temperature: f64) -> Result<()> {
    if !(temperature.is_finite() && temperature > 0.0) {
        bail!("nt_xent: temperature must be a positive number, got {temperature}");
    }
    Ok(())
}

/// Each row divided by its L2 norm (at least [`NORM_EPS`]).
fn unit_rows(z: &Tensor) -> Result<Tensor> {
    // max(‖z‖, eps) written as sqrt(max(‖z‖², eps²)): sqrt of an exact 0 would give an
    // infinite derivative and a NaN gradient through the zero row.
    let norm = z.sqr()?.sum_keepdim(1)?.maximum(NORM_EPS * NORM_EPS)?.sqrt()?;
    z.broadcast_div(&norm)
}

/// For `anchors` rows of a `[anchors, cols]` similarity matrix whose anchor `i` is column
/// `self_col(i)` of a batch of `cols = 2N` rows: the columns of every other row, and the
/// position of the positive (column `(self_col(i) + N) mod 2N`) among them.
fn anchor_indices(
    anchors: usize,
    cols: usize,
    self_col: impl Fn(usize) -> usize,
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    let n = cols / 2;
    let mut others = Vec::with_capacity(anchors * (cols - 1));
    let mut positive = Vec::with_capacity(anchors);
    for i in 0..anchors {
        let s = self_col(i);
        others.extend((0..cols).filter(|&j| j != s).map(|j| j as u32));
        let p = (s + n) % cols;
        // dropping column s shifts every later column one to the left
        positive.push(if p > s { p - 1 } else { p } as u32);
    }
    Ok((Tensor::from_vec(others, (anchors, cols - 1), device)?, Tensor::from_vec(positive, (anchors, 1), device)?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Var;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;
    use rand_distr::{Distribution, Normal};

    fn random(rows: usize, dim: usize, seed: u64) -> Vec<f64> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let normal = Normal::new(0.0, 1.0).expect("valid std");
        (0..rows * dim).map(|_| normal.sample(&mut rng)).collect()
    }

    /// The definition, one anchor and one entry at a time, in f64.
    fn naive(z: &[f64], rows: usize, dim: usize, tau: f64) -> f64 {
        let unit: Vec<Vec<f64>> = z
            .chunks(dim)
            .map(|r| {
                let norm = r.iter().map(|x| x * x).sum::<f64>().sqrt().max(NORM_EPS);
                r.iter().map(|x| x / norm).collect()
            })
            .collect();
        let n = rows / 2;
        let mut total = 0.0;
        for i in 0..rows {
            let logits: Vec<(usize, f64)> = (0..rows)
                .filter(|&j| j != i)
                .map(|j| (j, unit[i].iter().zip(&unit[j]).map(|(a, b)| a * b).sum::<f64>() / tau))
                .collect();
            let max = logits.iter().map(|&(_, l)| l).fold(f64::NEG_INFINITY, f64::max);
            let lse = max + logits.iter().map(|&(_, l)| (l - max).exp()).sum::<f64>().ln();
            let pos = logits.iter().find(|&&(j, _)| j == (i + n) % rows).map(|&(_, l)| l);
            total += lse - pos.expect("positive is among the others");
        }
        total / rows as f64
    }

    fn loss_of(z: &[f64], rows: usize, dim: usize, tau: f64) -> Result<f64> {
        let t = Tensor::from_vec(z.to_vec(), (rows, dim), &Device::Cpu)?;
        nt_xent(&t, tau)?.to_scalar::<f64>()
    }

    #[test]
    fn equals_naive_double_loop() -> Result<()> {
        let mut worst: f64 = 0.0;
        for (n, dim, tau, seed) in [(1, 3, 0.5, 0), (2, 5, 0.1, 1), (5, 7, 0.5, 2), (16, 8, 0.07, 3)] {
            let z = random(2 * n, dim, seed);
            let got = loss_of(&z, 2 * n, dim, tau)?;
            let want = naive(&z, 2 * n, dim, tau);
            worst = worst.max((got - want).abs());
            assert!((got - want).abs() <= 1e-6 * want.abs().max(1.0), "N={n}: {got} vs {want}");
        }
        // f32 input, checked against the f64 definition
        let z = random(10, 6, 4);
        let t = Tensor::from_vec(z.clone(), (10, 6), &Device::Cpu)?.to_dtype(DType::F32)?;
        let got = nt_xent(&t, 0.2)?.to_scalar::<f32>()? as f64;
        assert!((got - naive(&z, 10, 6, 0.2)).abs() <= 1e-5);
        eprintln!("nt_xent vs naive f64: max abs error {worst:.3e}");
        Ok(())
    }

    #[test]
    fn symmetric_in_the_two_views() -> Result<()> {
        let (n, dim) = (6, 5);
        let z = random(2 * n, dim, 7);
        let swapped: Vec<f64> = z[n * dim..].iter().chain(&z[..n * dim]).copied().collect();
        let a = loss_of(&z, 2 * n, dim, 0.3)?;
        let b = loss_of(&swapped, 2 * n, dim, 0.3)?;
        assert!((a - b).abs() <= 1e-12, "{a} vs {b}");
        Ok(())
    }

    #[test]
    fn gradient_matches_finite_differences() -> Result<()> {
        let (n, dim, tau) = (3, 4, 0.5);
        let z = random(2 * n, dim, 11);
        let var = Var::from_tensor(&Tensor::from_vec(z.clone(), (2 * n, dim), &Device::Cpu)?)?;
        let loss = nt_xent(var.as_tensor(), tau)?;
        let grads = loss.backward()?;
        let analytic = match grads.get(var.as_tensor()) {
            Some(g) => g.flatten_all()?.to_vec1::<f64>()?,
            None => bail!("no gradient for z"),
        };
        let h = 1e-6;
        let mut worst: f64 = 0.0;
        for k in 0..z.len() {
            let (mut plus, mut minus) = (z.clone(), z.clone());
            plus[k] += h;
            minus[k] -= h;
            let numeric = (loss_of(&plus, 2 * n, dim, tau)? - loss_of(&minus, 2 * n, dim, tau)?) / (2.0 * h);
            worst = worst.max((numeric - analytic[k]).abs());
        }
        eprintln!("nt_xent gradient vs central differences: max abs error {worst:.3e}");
        assert!(worst <= 1e-7, "max gradient error {worst}");
        Ok(())
    }

    #[test]
    fn perfectly_separated_views_reach_the_analytic_value() -> Result<()> {
        let (n, tau) = (4usize, 0.1);
        // regular simplex: N unit vectors with pairwise cosine −1/(N−1), the best any N
        // classes can be spread; both views identical, so every positive has cosine 1
        let mut z = vec![0.0; 2 * n * n];
        for view in 0..2 {
            for i in 0..n {
                for k in 0..n {
                    z[(view * n + i) * n + k] = if i == k { 1.0 } else { 0.0 } - 1.0 / n as f64;
                }
            }
        }
        let got = loss_of(&z, 2 * n, n, tau)?;
        let neg_cos = -1.0 / (n as f64 - 1.0);
        // −log(e^{1/τ} / (e^{1/τ} + (2N−2)·e^{cos/τ}))
        let want = (1.0 + (2.0 * n as f64 - 2.0) * ((neg_cos - 1.0) / tau).exp()).ln();
        assert!((got - want).abs() <= 1e-12, "{got} vs {want}");
        assert!(got < 1e-3, "a perfectly separated batch should have a near-zero loss");
        let t = Tensor::from_vec(z, (2 * n, n), &Device::Cpu)?;
        assert_eq!(contrastive_accuracy(&t)?, 1.0);
        Ok(())
    }

    #[test]
    fn batch_of_one_has_no_negatives() -> Result<()> {
        let var = Var::from_tensor(&Tensor::from_vec(random(2, 3, 5), (2, 3), &Device::Cpu)?)?;
        let loss = nt_xent(var.as_tensor(), 0.5)?;
        assert_eq!(loss.to_scalar::<f64>()?, 0.0);
        let grads = loss.backward()?;
        if let Some(g) = grads.get(var.as_tensor()) {
            assert!(g.abs()?.max_all()?.to_scalar::<f64>()? <= 1e-15);
        }
        assert_eq!(contrastive_accuracy(var.as_tensor())?, 1.0);
        Ok(())
    }

    #[test]
    fn zero_rows_give_finite_loss_and_gradient() -> Result<()> {
        let mut z = random(4, 3, 9);
        z[..3].fill(0.0);
        let var = Var::from_tensor(&Tensor::from_vec(z, (4, 3), &Device::Cpu)?)?;
        let loss = nt_xent(var.as_tensor(), 0.5)?;
        assert!(loss.to_scalar::<f64>()?.is_finite());
        let grads = loss.backward()?;
        let g = match grads.get(var.as_tensor()) {
            Some(g) => g.flatten_all()?.to_vec1::<f64>()?,
            None => bail!("no gradient for z"),
        };
        assert!(g.iter().all(|x| x.is_finite()));
        Ok(())
    }

    #[test]
    fn accuracy_counts_anchors_whose_positive_ranks_first() -> Result<()> {
        // rows 0/2 are a matching pair; row 1's nearest other row is row 0, not its pair 3
        let z = Tensor::new(&[[1.0f32, 0.0], [0.9, 0.1], [1.0, 0.0], [0.0, 1.0]], &Device::Cpu)?;
        // anchor 0: others 1 (cos≈.99), 2 (1.0), 3 (0) → positive 2 ranks first: hit
        // anchor 1: others 0 (.99), 2 (.99), 3 (.11) → positive 3 is last: miss
        // anchor 2: positive 0 (1.0) first: hit; anchor 3: positive 1 (.11) vs 0, 2 (0): hit
        assert_eq!(contrastive_accuracy(&z)?, 0.75);
        Ok(())
    }

    #[test]
    fn rejects_odd_rows_and_bad_temperature() {
        let z = Tensor::zeros((3, 2), DType::F32, &Device::Cpu).expect("zeros");
        assert!(nt_xent(&z, 0.5).is_err());
        let z = Tensor::ones((4, 2), DType::F32, &Device::Cpu).expect("ones");
        assert!(nt_xent(&z, 0.0).is_err());
        assert!(nt_xent(&z, f64::NAN).is_err());
    }
}
