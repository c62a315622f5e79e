//! Weighted k-nearest-neighbour classification of frozen features (InstDisc, Wu et al. 2018).
//!
//! Features are L2-normalised; each test feature's `k` most cosine-similar training features
//! vote for their class with weight `exp(sim / τ)`; the class with the largest total wins
//! (ties: the smaller class id). Needs no training, so it is a cheap second opinion on the
//! linear probe.

use candle_core::{Device, Tensor};
use indicatif::ProgressBar;
use serde::{Deserialize, Serialize};

use super::error::EvalError;
use super::features::Features;
use crate::Result;

/// Settings of the kNN classifier; written into the report next to the result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KnnConfig {
    /// Neighbours per query (InstDisc: 200).
    pub k: usize,
    /// Temperature of the vote weights exp(sim / τ) (InstDisc: 0.07).
    pub temperature: f64,
    /// Test rows per similarity matmul (bounds memory: `chunk × train` floats).
    pub chunk: usize,
}

impl Default for KnnConfig {
    fn default() -> Self {
        Self { k: 200, temperature: 0.07, chunk: 256 }
    }
}

/// What the classifier reached.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KnnReport {
    /// Top-1 accuracy on the test features, in [0, 1].
    pub test_top1: f64,
    pub train_size: usize,
    pub test_size: usize,
    pub dim: usize,
    pub num_classes: usize,
}

/// Rows scaled to unit L2 norm (a zero row stays zero).
fn normalized(f: &Features) -> Vec<f32> {
    f.x.chunks(f.dim.max(1))
        .flat_map(|r| {
            let n = r.iter().map(|v| v * v).sum::<f32>().sqrt();
            let s = if n > 0.0 { 1.0 / n } else { 0.0 };
            r.iter().map(move |v| v * s)
        })
        .collect()
}

/// The class voted for by one query's similarities to every training row.
fn vote(sims: &[f32], labels: &[u32], classes: usize, k: usize, temperature: f64) -> u32 {
    let mut idx: Vec<usize> = (0..sims.len()).collect();
    // Most similar first, ties by index, so the result does not depend on the sort algorithm.
    let by_sim = |a: &usize, b: &usize| sims[*b].total_cmp(&sims[*a]).then(a.cmp(b));
    if k < idx.len() {
        idx.select_nth_unstable_by(k - 1, by_sim);
        idx.truncate(k);
    }
    let mut score = vec![0f64; classes];
    for &i in &idx {
        score[labels[i] as usize] += (sims[i] as f64 / temperature).exp();
    }
    let mut best = 0;
    for (c, &s) in score.iter().enumerate() {
        if s > score[best] {
            best = c;
        }
    }
    best as u32
}

/// Predicted class of every test row.
pub fn predict(train: &Features, test: &Features, cfg: &KnnConfig) -> Result<Vec<u32>> {
    let bar = crate::progress::bar(test.n as u64, "queries", &format!("kNN (k = {})", cfg.k));
    let pred = predict_with(train, test, cfg, &bar);
    bar.finish_and_clear();
    pred
}

/// [`predict`], advancing `bar` by the queries done (the monitor passes a hidden one: its
/// measurement sits under the training bar).
pub fn predict_with(train: &Features, test: &Features, cfg: &KnnConfig, bar: &ProgressBar) -> Result<Vec<u32>> {
    train.validate()?;
    test.validate()?;
    if cfg.k == 0 || cfg.chunk == 0 || cfg.temperature.is_nan() || cfg.temperature <= 0.0 {
        return Err(EvalError::Settings {
            what: "kNN",
            problems: vec![format!("k and chunk must be at least 1 and the temperature > 0, got {cfg:?}")],
        }
        .into());
    }
    if train.dim != test.dim || train.n == 0 {
        return Err(EvalError::Shape {
            what: "kNN",
            why: format!("train is {}×{}, test {}×{}", train.n, train.dim, test.n, test.dim),
        }
        .into());
    }
    let classes = train.num_classes.max(test.num_classes);
    let k = cfg.k.min(train.n);
    let bank = Tensor::from_vec(normalized(train), (train.n, train.dim), &Device::Cpu)?.t()?;
    let queries = normalized(test);
    let mut pred = Vec::with_capacity(test.n);
    for rows in queries.chunks(cfg.chunk * test.dim.max(1)) {
        let q = Tensor::from_slice(rows, (rows.len() / test.dim.max(1), test.dim), &Device::Cpu)?;
        // [chunk, dim] × [dim, train] = all cosine similarities of the chunk at once
        let sims = q.matmul(&bank)?.to_vec2::<f32>()?;
        pred.extend(sims.iter().map(|s| vote(s, &train.labels, classes, k, cfg.temperature)));
        bar.inc(sims.len() as u64);
    }
    Ok(pred)
}

/// Classifies `test` by its neighbours in `train` and reports top-1.
pub fn knn(train: &Features, test: &Features, cfg: &KnnConfig) -> Result<KnnReport> {
    report(train, test, predict(train, test, cfg)?)
}

/// [`knn`] without a progress bar of its own.
pub fn knn_quiet(train: &Features, test: &Features, cfg: &KnnConfig) -> Result<KnnReport> {
    report(train, test, predict_with(train, test, cfg, &ProgressBar::hidden())?)
}

fn report(train: &Features, test: &Features, pred: Vec<u32>) -> Result<KnnReport> {
    let hits = pred.iter().zip(&test.labels).filter(|(p, l)| p == l).count();
    Ok(KnnReport {
        test_top1: hits as f64 / test.n.max(1) as f64,
        train_size: train.n,
        test_size: test.n,
        dim: train.dim,
        num_classes: train.num_classes.max(test.num_classes),
    })
}
