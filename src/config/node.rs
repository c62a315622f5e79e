//! `nodes:` — what each node of the graph computes.

use serde::{Deserialize, Serialize};

use crate::loss::Negatives;
use crate::nn::decoder::DecoderConfig;
use crate::nn::image_decoder::ImageDecoderConfig;
use crate::nn::stage::StageConfig;
use crate::nn::stem::StemConfig;
use crate::nn::Cost;

fn half() -> f64 {
    0.5
}
fn unit() -> f64 {
    1.0
}

/// `op: nt_xent` — SimCLR's contrastive loss on the two views of each image.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct NtXentConfig {
    /// Softmax temperature τ (SimCLR: 0.5 on CIFAR, 0.1 at batch 4096).
    #[serde(default = "half")]
    pub temperature: f64,
    /// Multiplies this loss's gradient (and its logged value is left unscaled).
    #[serde(default = "unit")]
    pub weight: f64,
    /// Across ranks (`mpirun -np N`): `global` contrasts each anchor with every rank's rows, the
    /// loss of one process on the whole batch; `local` with its own rank's only. One process:
    /// the same either way.
    #[serde(default)]
    pub negatives: Negatives,
}

/// `op: cross_entropy` — a supervised loss: `logits` (a classifier decoder's `[classes]`) against
/// the batch's `labels` (DGL's auxiliary classifiers, InfoPro's classification term). Both views
/// of an image carry its label.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CrossEntropyConfig {
    /// Multiplies this loss's gradient (and its logged value is left unscaled).
    #[serde(default = "unit")]
    pub weight: f64,
}

/// `op: mse` — the mean squared error of a `prediction` against a `target` of the same shape
/// (InfoPro's reconstruction of the input).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MseConfig {
    /// Multiplies this loss's gradient (and its logged value is left unscaled).
    #[serde(default = "unit")]
    pub weight: f64,
}

/// `op: neg_cosine` — SimSiam's and BYOL's loss: minus the cosine similarity of each view's
/// `prediction` with the other view's `target`, symmetrised,
/// `−½ (cos(p₁, z₂) + cos(p₂, z₁))` averaged over the images. The stop-gradient on the target is
/// the edge's (`stop: all`), not the loss's.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct NegCosineConfig {
    /// Multiplies this loss's gradient (and its logged value is left unscaled).
    #[serde(default = "unit")]
    pub weight: f64,
}

fn ema_momentum() -> f64 {
    0.996
}

/// `op: ema` — a moving average of another node (BYOL's and MoCo's target network): the same
/// layer as `of` with parameters of its own that no gradient trains; after each step
/// `θ ← m·θ + (1 − m)·θ_of`, with `m` going from `momentum` to `final_momentum` along a cosine over
/// the run (BYOL's schedule; equal values keep it constant). It starts as a copy of `of`, runs
/// batch norm in training mode, and is checkpointed and resumed like every parameter.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct EmaConfig {
    /// The node it averages (a stem, stage or decoder reading an input of the same shape).
    pub of: String,
    /// The momentum at the first step (BYOL: 0.996).
    #[serde(default = "ema_momentum")]
    pub momentum: f64,
    /// The momentum at the last step (BYOL: 1.0).
    #[serde(default = "unit")]
    pub final_momentum: f64,
}

impl EmaConfig {
    /// The momentum after `step` of `total` steps: `f − (f − m)·(cos(π·step/total) + 1)/2`.
    pub fn momentum_at(&self, step: u64, total: u64) -> f64 {
        let t = if total == 0 { 1.0 } else { step as f64 / total as f64 };
        let (m, f) = (self.momentum, self.final_momentum);
        f - (f - m) * ((std::f64::consts::PI * t).cos() + 1.0) / 2.0
    }
}

/// What a node reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Inputs {
    /// One input; its edge names no slot.
    One,
    /// These inputs, each fed by exactly one edge naming it with `as:`, in this order.
    Named(&'static [&'static str]),
}

/// One node. The id (its key under `nodes:`) names its parameters, checkpoint keys, ONNX
/// tensors and log columns.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum NodeConfig {
    /// The convolution(s) in front of res2.
    Stem(StemConfig),
    /// A stage of residual blocks (res2, res3, …).
    Stage(StageConfig),
    /// A projection head: optional conv block → pool → MLP.
    Decoder(DecoderConfig),
    /// InfoPro's reconstruction decoder: bilinear resize to the image's size → conv → conv.
    ImageDecoder(ImageDecoderConfig),
    /// A contrastive loss on a decoder's output.
    NtXent(NtXentConfig),
    /// A supervised loss on a classifier's logits and the batch's labels.
    CrossEntropy(CrossEntropyConfig),
    /// A reconstruction loss.
    Mse(MseConfig),
    /// A predictor's output against the other view's target (SimSiam, BYOL).
    NegCosine(NegCosineConfig),
    /// A moving average of another node (BYOL's target).
    Ema(EmaConfig),
}

impl NtXentConfig {
    /// NT-Xent keeps its `2N × 2N` similarities, their exponentials, the softmax and its
    /// gradient: four matrices of the batch's square.
    pub fn cost(&self) -> Cost {
        Cost { pairwise: 4, ..Cost::default() }
    }
}

impl NodeConfig {
    /// What the node costs per image on a per-image `input` shape that [`crate::graph::shape`]
    /// accepted (the layer spec's own count; zero where the input does not fit).
    pub fn cost(&self, input: &[usize]) -> Cost {
        match (self, input) {
            (NodeConfig::Stem(s), &[c, h, w]) => s.cost([c, h, w]),
            (NodeConfig::Stage(s), &[c, h, w]) => s.cost([c, h, w]),
            (NodeConfig::Decoder(d), _) => d.cost(input),
            (NodeConfig::ImageDecoder(d), &[c, h, w]) => d.cost([c, h, w]),
            (NodeConfig::NtXent(l), _) => l.cost(),
            // The softmax's probabilities and its gradient, per image.
            (NodeConfig::CrossEntropy(_), _) => {
                Cost { saved: 2 * input.iter().product::<usize>() as u64, ..Cost::default() }
            }
            // The difference, per element.
            (NodeConfig::Mse(_), _) => Cost { saved: input.iter().product::<usize>() as u64, ..Cost::default() },
            // Both inputs normalised, and their norms.
            (NodeConfig::NegCosine(_), _) => {
                Cost { saved: 2 * input.iter().product::<usize>() as u64 + 2, ..Cost::default() }
            }
            _ => Cost::default(),
        }
    }
    /// The factor on a loss's gradient (1 for every other node).
    pub fn loss_weight(&self) -> f64 {
        match self {
            NodeConfig::NtXent(l) => l.weight,
            NodeConfig::CrossEntropy(l) => l.weight,
            NodeConfig::Mse(l) => l.weight,
            NodeConfig::NegCosine(l) => l.weight,
            _ => 1.0,
        }
    }
    /// What the node reads.
    pub fn inputs(&self) -> Inputs {
        match self {
            NodeConfig::CrossEntropy(_) => Inputs::Named(&["logits", "labels"]),
            NodeConfig::Mse(_) | NodeConfig::NegCosine(_) => Inputs::Named(&["prediction", "target"]),
            _ => Inputs::One,
        }
    }
    pub fn op_name(&self) -> &'static str {
        match self {
            NodeConfig::Stem(_) => "stem",
            NodeConfig::Stage(_) => "stage",
            NodeConfig::Decoder(_) => "decoder",
            NodeConfig::ImageDecoder(_) => "image_decoder",
            NodeConfig::NtXent(_) => "nt_xent",
            NodeConfig::CrossEntropy(_) => "cross_entropy",
            NodeConfig::Mse(_) => "mse",
            NodeConfig::NegCosine(_) => "neg_cosine",
            NodeConfig::Ema(_) => "ema",
        }
    }
    pub fn is_loss(&self) -> bool {
        matches!(
            self,
            NodeConfig::NtXent(_) | NodeConfig::CrossEntropy(_) | NodeConfig::Mse(_) | NodeConfig::NegCosine(_)
        )
    }
    /// Has parameters that an optimizer updates.
    pub fn is_trainable(&self) -> bool {
        match self {
            NodeConfig::Stem(c) => !c.frozen,
            NodeConfig::Stage(c) => !c.frozen,
            NodeConfig::Decoder(c) => !c.frozen,
            NodeConfig::ImageDecoder(c) => !c.frozen,
            _ => false,
        }
    }
    pub fn is_frozen(&self) -> bool {
        match self {
            NodeConfig::Stem(c) => c.frozen,
            NodeConfig::Stage(c) => c.frozen,
            NodeConfig::Decoder(c) => c.frozen,
            NodeConfig::ImageDecoder(c) => c.frozen,
            _ => false,
        }
    }
}
