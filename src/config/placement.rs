//! `placement:` — which rank runs which node when the units of a local method train on separate
//! workers (`mpirun -np N`), and how the ranks schedule their steps.

use indexmap::IndexMap;
use serde::{Deserialize, Serialize};

/// What an automatic placement balances over the ranks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Balance {
    /// Multiply-accumulates per step, backward passes included (a LoCo shared stage runs two).
    #[default]
    Compute,
    /// Activations kept for the backward, and parameters with their gradients and optimizer state.
    Memory,
    /// The same number of encoder stages on every rank (the naive split, for comparison).
    Count,
}

/// When a rank may start the next step.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum PipelineSchedule {
    /// Every gradient of step t is computed and applied in step t: the weights equal a
    /// single-process run's.
    #[default]
    Exact,
    /// A rank starts step t+1 as soon as its inputs exist; a gradient that comes back from a rank
    /// above (LoCo's shared stage, for the upper unit's loss) is applied one step late
    /// (docs/parallel.md says exactly what each gradient is computed against).
    Pipelined,
}

/// `placement: {nodes: {stem: 0, res2: 0, res3: 1, …}}` or `placement: {by: compute}`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PlacementConfig {
    /// Node id → rank. Every stem and stage when given; a decoder, loss or moving average left out
    /// runs on the rank of the node it reads. Empty: placed automatically ([`Balance`]).
    #[serde(default, skip_serializing_if = "IndexMap::is_empty")]
    pub nodes: IndexMap<String, usize>,
    /// What an automatic placement balances.
    #[serde(default)]
    pub by: Balance,
    /// When a rank may start the next step.
    #[serde(default)]
    pub schedule: PipelineSchedule,
}
