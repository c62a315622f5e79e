//! `nodes:` — what each node of the graph computes.

use serde::{Deserialize, Serialize};

use crate::nn::decoder::DecoderConfig;
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
    /// A contrastive loss on a decoder's output.
    NtXent(NtXentConfig),
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
            (NodeConfig::NtXent(l), _) => l.cost(),
            _ => Cost::default(),
        }
    }
    /// The factor on a loss's gradient (1 for every other node).
    pub fn loss_weight(&self) -> f64 {
        match self {
            NodeConfig::NtXent(l) => l.weight,
            _ => 1.0,
        }
    }
    pub fn op_name(&self) -> &'static str {
        match self {
            NodeConfig::Stem(_) => "stem",
            NodeConfig::Stage(_) => "stage",
            NodeConfig::Decoder(_) => "decoder",
            NodeConfig::NtXent(_) => "nt_xent",
        }
    }
    pub fn is_loss(&self) -> bool {
        matches!(self, NodeConfig::NtXent(_))
    }
    /// Has parameters that an optimizer updates.
    pub fn is_trainable(&self) -> bool {
        match self {
            NodeConfig::Stem(c) => !c.frozen,
            NodeConfig::Stage(c) => !c.frozen,
            NodeConfig::Decoder(c) => !c.frozen,
            NodeConfig::NtXent(_) => false,
        }
    }
    pub fn is_frozen(&self) -> bool {
        match self {
            NodeConfig::Stem(c) => c.frozen,
            NodeConfig::Stage(c) => c.frozen,
            NodeConfig::Decoder(c) => c.frozen,
            NodeConfig::NtXent(_) => false,
        }
    }
}
