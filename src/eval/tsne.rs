//! Exact t-SNE (van der Maaten & Hinton, 2008) for the paper's Fig. 2 (500 points).
//!
//! O(n²) per iteration, which is nothing at 500 points and keeps the code a direct transcript
//! of the reference `tsne.py` (binary search for each point's bandwidth, symmetrised P, early
//! exaggeration, momentum with per-coordinate gains), with sklearn's defaults for the constants.
//! Everything is sequential f64 arithmetic from a seeded generator: the same seed gives the
//! same embedding bit for bit.

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};
use serde::{Deserialize, Serialize};

use super::error::EvalError;
use crate::Result;

/// t-SNE settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TsneConfig {
    /// Effective number of neighbours of each point.
    pub perplexity: f64,
    /// Gradient-descent iterations.
    pub iterations: usize,
    /// Step size; `None` = sklearn's "auto", max(n / early_exaggeration / 4, 50), which keeps
    /// small sets (the paper's 500 points) from flinging points far out during exaggeration.
    pub learning_rate: Option<f64>,
    /// P is multiplied by this during the first `exaggeration_iterations`, so clusters form
    /// before they settle.
    pub early_exaggeration: f64,
    pub exaggeration_iterations: usize,
    /// Initial positions N(0, 1e-4²).
    pub seed: u64,
}

impl Default for TsneConfig {
    fn default() -> Self {
        Self {
            perplexity: 30.0,
            iterations: 1000,
            learning_rate: None,
            early_exaggeration: 12.0,
            exaggeration_iterations: 250,
            seed: 0,
        }
    }
}

/// Squared Euclidean distances between the rows of `x` (`[n, dim]`, row-major).
fn sq_distances(x: &[f32], n: usize, dim: usize) -> Vec<f64> {
    let mut d = vec![0f64; n * n];
    for i in 0..n {
        for j in i + 1..n {
            let s: f64 = (0..dim).map(|k| (x[i * dim + k] - x[j * dim + k]) as f64).map(|v| v * v).sum();
            d[i * n + j] = s;
            d[j * n + i] = s;
        }
    }
    d
}

/// Row `i` of the conditional P for precision `beta`; returns the entropy (nats).
fn conditional_row(d: &[f64], i: usize, beta: f64, row: &mut [f64]) -> f64 {
    let n = row.len();
    // Shift by the smallest distance so exp() cannot underflow the whole row to 0.
    let dmin = (0..n).filter(|&j| j != i).map(|j| d[j]).fold(f64::INFINITY, f64::min);
    let mut sum = 0.0;
    for j in 0..n {
        row[j] = if j == i { 0.0 } else { (-(d[j] - dmin) * beta).exp() };
        sum += row[j];
    }
    let mut h = 0.0;
    for v in row.iter_mut() {
        *v /= sum;
        if *v > 1e-300 {
            h -= *v * v.ln();
        }
    }
    h
}

/// Joint probabilities P (`[n, n]`), each row's bandwidth found by bisection on its entropy.
fn joint_p(d: &[f64], n: usize, perplexity: f64) -> Vec<f64> {
    let target = perplexity.ln();
    let mut p = vec![0f64; n * n];
    for i in 0..n {
        let (mut beta, mut lo, mut hi) = (1.0, f64::NEG_INFINITY, f64::INFINITY);
        let di = &d[i * n..(i + 1) * n];
        // Distances in feature space can be any scale; start near 1 / mean distance.
        let mean = di.iter().sum::<f64>() / (n - 1) as f64;
        if mean > 0.0 {
            beta = 1.0 / mean;
        }
        for _ in 0..100 {
            let h = conditional_row(di, i, beta, &mut p[i * n..(i + 1) * n]);
            if (h - target).abs() < 1e-5 {
                break;
            }
            if h > target {
                lo = beta;
                beta = if hi.is_finite() { (beta + hi) / 2.0 } else { beta * 2.0 };
            } else {
                hi = beta;
                beta = if lo.is_finite() { (beta + lo) / 2.0 } else { beta / 2.0 };
            }
        }
    }
    let mut joint = vec![0f64; n * n];
    for i in 0..n {
        for j in 0..n {
            joint[i * n + j] = ((p[i * n + j] + p[j * n + i]) / (2.0 * n as f64)).max(1e-12);
        }
    }
    joint
}

/// Embeds the rows of `x` (`[n, dim]`, row-major) in 2-D.
///
/// # Shapes
/// `x: [n, dim]` → `n` points `[f64; 2]`.
pub fn tsne(x: &[f32], n: usize, dim: usize, cfg: &TsneConfig) -> Result<Vec<[f64; 2]>> {
    if x.len() != n * dim || n < 2 {
        return Err(EvalError::Shape {
            what: "t-SNE",
            why: format!("{} values for {n} points of width {dim} (need ≥ 2 points)", x.len()),
        }
        .into());
    }
    if !(cfg.perplexity > 0.0 && cfg.perplexity < (n - 1) as f64) {
        return Err(EvalError::Settings {
            what: "t-SNE",
            problems: vec![format!("perplexity {} must be in (0, n - 1 = {})", cfg.perplexity, n - 1)],
        }
        .into());
    }
    if x.iter().any(|v| !v.is_finite()) {
        return Err(EvalError::Shape { what: "t-SNE", why: "the features contain NaN or infinity".into() }.into());
    }
    let lr = cfg.learning_rate.unwrap_or((n as f64 / cfg.early_exaggeration / 4.0).max(50.0));
    let p = joint_p(&sq_distances(x, n, dim), n, cfg.perplexity);
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
    let normal = Normal::new(0.0, 1e-4).map_err(|e| EvalError::Shape { what: "t-SNE", why: e.to_string() })?;
    let mut y: Vec<[f64; 2]> = (0..n).map(|_| [normal.sample(&mut rng), normal.sample(&mut rng)]).collect();
    let mut velocity = vec![[0f64; 2]; n];
    let mut gains = vec![[1f64; 2]; n];
    let mut num = vec![0f64; n * n];
    let bar = crate::progress::bar(cfg.iterations as u64, "iterations", &format!("t-SNE of {n} points"));
    for it in 0..cfg.iterations {
        bar.inc(1);
        let exaggeration = if it < cfg.exaggeration_iterations { cfg.early_exaggeration } else { 1.0 };
        let momentum = if it < cfg.exaggeration_iterations { 0.5 } else { 0.8 };
        // Student-t kernel 1 / (1 + |yi - yj|²) and its sum (Q's normaliser).
        let mut total = 0.0;
        for i in 0..n {
            for j in i + 1..n {
                let (a, b) = (y[i][0] - y[j][0], y[i][1] - y[j][1]);
                let v = 1.0 / (1.0 + a * a + b * b);
                num[i * n + j] = v;
                num[j * n + i] = v;
                total += 2.0 * v;
            }
        }
        for i in 0..n {
            let mut g = [0f64; 2];
            for j in 0..n {
                if i == j {
                    continue;
                }
                let q = (num[i * n + j] / total).max(1e-12);
                let f = 4.0 * (exaggeration * p[i * n + j] - q) * num[i * n + j];
                g[0] += f * (y[i][0] - y[j][0]);
                g[1] += f * (y[i][1] - y[j][1]);
            }
            for k in 0..2 {
                // Grow the step where the gradient keeps its direction, shrink where it flips.
                gains[i][k] = if (g[k] > 0.0) != (velocity[i][k] > 0.0) {
                    gains[i][k] + 0.2
                } else {
                    (gains[i][k] * 0.8).max(0.01)
                };
                velocity[i][k] = momentum * velocity[i][k] - lr * gains[i][k] * g[k];
            }
        }
        let mut mean = [0f64; 2];
        for i in 0..n {
            for k in 0..2 {
                y[i][k] += velocity[i][k];
                mean[k] += y[i][k] / n as f64;
            }
        }
        for yi in &mut y {
            yi[0] -= mean[0];
            yi[1] -= mean[1];
        }
    }
    bar.finish_and_clear();
    Ok(y)
}

/// Indices of the first `per_class` rows of each of the classes `0..classes`, class by class
/// (the paper's "500 images from 10 classes" is `classes = 10, per_class = 50`). Classes with
/// fewer rows contribute what they have.
pub fn first_per_class(labels: &[u32], classes: usize, per_class: usize) -> Vec<usize> {
    let mut out = vec![];
    for c in 0..classes as u32 {
        out.extend(labels.iter().enumerate().filter(|(_, &l)| l == c).map(|(i, _)| i).take(per_class));
    }
    out
}
