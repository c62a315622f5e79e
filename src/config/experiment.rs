//! The experiment file: one YAML document, `version: 1`.

use std::path::PathBuf;

use indexmap::IndexMap;
use serde::{Deserialize, Serialize};

use super::edge::EdgeConfig;
use super::monitor::MonitorConfig;
use super::node::NodeConfig;
use crate::data::DataConfig;
use crate::optim::{OptimizerConfig, ScheduleConfig};

/// Where tensors live.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum DeviceKind {
    #[default]
    Cpu,
    /// Needs a build with `--features cuda`.
    Cuda,
}

/// The type activations and matrix products are computed in. Master weights, batch-norm
/// statistics, losses and optimizer state stay f32 whatever this says ("mixed precision").
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Precision {
    #[default]
    F32,
    /// bfloat16 (f32's range, 8-bit mantissa): on CUDA, and on CPU where locograph is built with
    /// oneDNN (its bf16 convolutions use AVX512-BF16 or AMX where the CPU has them).
    Bf16,
    /// IEEE half (5-bit exponent): runs on CPU too, which is how the mixed-precision path is tested.
    F16,
}

impl Precision {
    pub fn dtype(self) -> candle_core::DType {
        match self {
            Precision::F32 => candle_core::DType::F32,
            Precision::Bf16 => candle_core::DType::BF16,
            Precision::F16 => candle_core::DType::F16,
        }
    }
}

/// The image batch the graph's `input` node produces.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct InputConfig {
    /// Channels after augmentation (1 for Fashion-MNIST, 3 for colour images).
    pub channels: usize,
    /// Side of the square crop the model sees.
    pub size: usize,
}

fn is_f32(p: &Precision) -> bool {
    *p == Precision::F32
}

fn ten() -> u64 {
    10
}
fn yes() -> bool {
    true
}
fn twenty_five() -> f64 {
    25.0
}

/// How long and how to train.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    /// Images per step; each contributes two augmented views, so the graph sees 2× this.
    pub batch_size: usize,
    /// Optimizer steps (give `steps` or `epochs`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub steps: Option<u64>,
    /// Passes over the training set (give `steps` or `epochs`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epochs: Option<u64>,
    /// Write a `metrics.csv` row every this many steps.
    #[serde(default = "ten")]
    pub log_every: u64,
    /// CPU threads for candle's kernels (default: all cores).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub threads: Option<usize>,
    /// Folder in which each run gets its own directory, relative to this file like every other
    /// path in it. Left out: `runs/` in the working directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runs_dir: Option<PathBuf>,
    /// Save a checkpoint every this many steps (always at the end).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint_every: Option<u64>,
    /// Across ranks: batch norm in training mode normalises with the statistics of the global
    /// batch (all ranks' shares), as one process would. `false`: each rank its own share's.
    /// One process: no effect.
    #[serde(default = "yes")]
    pub sync_batch_norm: bool,
    /// Across ranks: gradients are averaged in buckets of this many MiB (PyTorch DDP's 25), each
    /// started as soon as it is full while the backward goes on. One process: no effect.
    #[serde(default = "twenty_five")]
    pub gradient_bucket_mb: f64,
}

/// A whole experiment. Node ids are the names of everything the run produces.
#[derive(Clone, Debug, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Experiment {
    /// File format version; must be 1.
    pub version: u32,
    /// Run name (run directories are `runs/<name>-<timestamp>`).
    pub name: String,
    /// What this experiment reproduces.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Seeds initialisation, data order and augmentation.
    #[serde(default)]
    pub seed: u64,
    #[serde(default)]
    pub device: DeviceKind,
    /// Compute precision (`f32`, `bf16` on CUDA, `f16`); weights stay f32.
    #[serde(default, skip_serializing_if = "is_f32")]
    pub precision: Precision,
    pub input: InputConfig,
    /// A graph file (relative to this file) whose `nodes:` are added to this file's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encoder: Option<PathBuf>,
    /// Node id → what it computes. `input` is reserved for the image batch.
    #[serde(default)]
    pub nodes: IndexMap<String, NodeConfig>,
    /// The graph's edges; `stop` marks where gradients are cut and for which losses.
    pub edges: Vec<EdgeConfig>,
    pub data: DataConfig,
    pub optimizer: OptimizerConfig,
    pub schedule: ScheduleConfig,
    pub train: TrainConfig,
    /// Units on separate ranks (stage-parallel training under `mpirun`); absent: every rank runs
    /// every node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub placement: Option<super::placement::PlacementConfig>,
    /// Online kNN accuracy during training (off when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub monitor: Option<MonitorConfig>,
}

/// A reusable encoder file in `graphs/`: nodes only; experiments add decoders, losses, edges.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct GraphFile {
    pub version: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    pub nodes: IndexMap<String, NodeConfig>,
}
