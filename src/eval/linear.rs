//! The linear probe: a linear layer trained on frozen features, top-1 on the test split.
//!
//! As the paper (and SimCLR) evaluate: SGD without momentum by default, a step schedule that
//! multiplies the LR by 0.1 at 30 %, 60 % and 90 % of the epochs (30/60/90 of 100). Unlike the
//! paper, features are standardised by default (per-dimension mean/std of the *training*
//! features, applied to both splits): the paper's LR 30 suits ImageNet ResNet-50 features,
//! while standardised features make one LR work across nodes and methods of different scales.
//! A linear map of standardised features is still a linear classifier of the raw features.
//! Only the linear layer is trained; the features are fixed numbers, so the encoder cannot move.

use candle_core::{DType, Device, Tensor, Var, D};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::error::EvalError;
use super::features::Features;
use crate::nn::{Param, ParamKind};
use crate::optim::{LrSchedule, Optimizer, Sgd, SgdConfig};
use crate::Result;

/// Settings of the probe; written into the report next to the result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LinearConfig {
    /// Passes over the training features.
    pub epochs: usize,
    /// Initial learning rate (per mean-reduced mini-batch loss).
    pub lr: f64,
    /// Features per SGD step.
    pub batch_size: usize,
    /// L2 penalty on the weights (not the bias).
    pub weight_decay: f64,
    /// SGD momentum; the paper uses none.
    pub momentum: f64,
    /// Fractions of the epochs after which the LR is multiplied by `gamma`.
    pub milestones: Vec<f64>,
    /// LR factor at each milestone.
    pub gamma: f64,
    /// Standardise features with the training split's mean and std.
    pub standardize: bool,
    /// Shuffling and initialisation.
    pub seed: u64,
}

impl Default for LinearConfig {
    fn default() -> Self {
        Self {
            epochs: 100,
            lr: 0.1,
            batch_size: 256,
            weight_decay: 0.0,
            momentum: 0.0,
            milestones: vec![0.3, 0.6, 0.9],
            gamma: 0.1,
            standardize: true,
            seed: 0,
        }
    }
}

impl LinearConfig {
    /// All problems at once.
    pub fn validate(&self) -> Result<()> {
        let mut why = vec![];
        if self.epochs == 0 {
            why.push("epochs must be at least 1".to_string());
        }
        if self.batch_size == 0 {
            why.push("batch_size must be at least 1".to_string());
        }
        if !(self.lr > 0.0 && self.lr.is_finite()) {
            why.push(format!("lr must be > 0, got {}", self.lr));
        }
        if !(self.weight_decay >= 0.0 && self.weight_decay.is_finite()) {
            why.push(format!("weight_decay must be >= 0, got {}", self.weight_decay));
        }
        if !(0.0..1.0).contains(&self.momentum) {
            why.push(format!("momentum must be in [0, 1), got {}", self.momentum));
        }
        if self.milestones.iter().any(|m| !(0.0..=1.0).contains(m)) {
            why.push(format!("milestones are fractions of the epochs in [0, 1], got {:?}", self.milestones));
        }
        if why.is_empty() {
            Ok(())
        } else {
            Err(EvalError::Settings { what: "linear probe", problems: why }.into())
        }
    }
}

/// What the probe reached.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LinearReport {
    /// Top-1 accuracy on the test features, in [0, 1].
    pub test_top1: f64,
    /// Top-1 accuracy on the training features.
    pub train_top1: f64,
    /// Mean cross-entropy of the last epoch.
    pub final_train_loss: f64,
    pub train_size: usize,
    pub test_size: usize,
    pub dim: usize,
    pub num_classes: usize,
}

/// Per-dimension mean and std of `f` (std floored so constant dimensions do not blow up).
fn moments(f: &Features) -> (Vec<f32>, Vec<f32>) {
    let mut mean = vec![0f64; f.dim];
    let mut sq = vec![0f64; f.dim];
    for i in 0..f.n {
        for (j, &v) in f.row(i).iter().enumerate() {
            mean[j] += v as f64;
            sq[j] += (v as f64) * (v as f64);
        }
    }
    let n = f.n.max(1) as f64;
    let m: Vec<f32> = mean.iter().map(|s| (s / n) as f32).collect();
    let s: Vec<f32> =
        mean.iter().zip(&sq).map(|(s, q)| ((q / n - (s / n) * (s / n)).max(0.0).sqrt().max(1e-6)) as f32).collect();
    (m, s)
}

fn to_tensor(f: &Features, norm: Option<&(Vec<f32>, Vec<f32>)>) -> Result<Tensor> {
    let x = match norm {
        Some((m, s)) => f.x.chunks(f.dim).flat_map(|r| r.iter().zip(m).zip(s).map(|((v, m), s)| (v - m) / s)).collect(),
        None => f.x.clone(),
    };
    Ok(Tensor::from_vec(x, (f.n, f.dim), &Device::Cpu)?)
}

fn accuracy(logits: &Tensor, labels: &[u32]) -> Result<f64> {
    let pred = logits.argmax(D::Minus1)?.to_vec1::<u32>()?;
    let hits = pred.iter().zip(labels).filter(|(p, l)| p == l).count();
    Ok(hits as f64 / labels.len().max(1) as f64)
}

/// Trains a linear classifier on `train` and reports top-1 on `test`.
///
/// # Shapes
/// Features `[n, dim]`; the layer is `W: [dim, classes]`, `b: [classes]`.
pub fn probe(train: &Features, test: &Features, cfg: &LinearConfig) -> Result<LinearReport> {
    cfg.validate()?;
    train.validate()?;
    test.validate()?;
    if train.dim != test.dim || train.n == 0 || test.n == 0 {
        return Err(EvalError::Shape {
            what: "linear probe",
            why: format!("train is {}×{}, test {}×{}", train.n, train.dim, test.n, test.dim),
        }
        .into());
    }
    let classes = train.num_classes.max(test.num_classes);
    let norm = cfg.standardize.then(|| moments(train));
    let xtr = to_tensor(train, norm.as_ref())?;
    let xte = to_tensor(test, norm.as_ref())?;
    let ytr = Tensor::new(train.labels.as_slice(), &Device::Cpu)?;

    // PyTorch nn.Linear's init, U(-1/√dim, 1/√dim), drawn from the seed for reproducibility.
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
    let bound = 1.0 / (train.dim as f32).sqrt();
    let w0: Vec<f32> = (0..train.dim * classes).map(|_| rand::Rng::gen_range(&mut rng, -bound..bound)).collect();
    let w = Var::from_tensor(&Tensor::from_vec(w0, (train.dim, classes), &Device::Cpu)?)?;
    let b = Var::from_tensor(&Tensor::zeros(classes, DType::F32, &Device::Cpu)?)?;
    let params = vec![
        Param { name: "probe.weight".into(), var: w.clone(), kind: ParamKind::Weight, trainable: true },
        Param { name: "probe.bias".into(), var: b.clone(), kind: ParamKind::Bias, trainable: true },
    ];
    let mut opt = Sgd::new(SgdConfig {
        momentum: cfg.momentum,
        nesterov: false,
        weight_decay: cfg.weight_decay,
        exclude_bias_and_norm_from_weight_decay: true,
    });
    let steps_per_epoch = train.n.div_ceil(cfg.batch_size);
    let milestones =
        cfg.milestones.iter().map(|m| (m * cfg.epochs as f64).round() as usize * steps_per_epoch).collect();
    let schedule = LrSchedule::step(cfg.lr, 0, milestones, cfg.gamma);

    let mut order: Vec<usize> = (0..train.n).collect();
    let mut step = 0;
    let mut last_loss = f64::NAN;
    let bar = crate::progress::bar(cfg.epochs as u64, "epochs", "linear probe");
    for _ in 0..cfg.epochs {
        bar.inc(1);
        order.shuffle(&mut rng);
        let (mut sum, mut count) = (0.0, 0usize);
        for chunk in order.chunks(cfg.batch_size) {
            let idx = Tensor::new(chunk.iter().map(|&i| i as u32).collect::<Vec<_>>().as_slice(), &Device::Cpu)?;
            let x = xtr.index_select(&idx, 0)?;
            let y = ytr.index_select(&idx, 0)?;
            let logits = x.matmul(w.as_tensor())?.broadcast_add(b.as_tensor())?;
            let loss = candle_nn::loss::cross_entropy(&logits, &y)?;
            let grads = loss.backward()?;
            let g = vec![grads.get(w.as_tensor()).cloned(), grads.get(b.as_tensor()).cloned()];
            opt.step(&params, &g, schedule.lr(step))?;
            let l = loss.to_scalar::<f32>()? as f64;
            if !l.is_finite() {
                return Err(EvalError::ProbeDiverged { loss: l, step }.into());
            }
            sum += l * chunk.len() as f64;
            count += chunk.len();
            step += 1;
        }
        last_loss = sum / count.max(1) as f64;
        bar.set_message(format!("loss {last_loss:.4}"));
    }
    bar.finish_and_clear();
    let logits = |x: &Tensor| -> Result<Tensor> { Ok(x.matmul(w.as_tensor())?.broadcast_add(b.as_tensor())?) };
    Ok(LinearReport {
        test_top1: accuracy(&logits(&xte)?, &test.labels)?,
        train_top1: accuracy(&logits(&xtr)?, &train.labels)?,
        final_train_loss: last_loss,
        train_size: train.n,
        test_size: test.n,
        dim: train.dim,
        num_classes: classes,
    })
}
