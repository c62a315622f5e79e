//! The nodes and edges of a compiled graph.

use crate::config::{Location, NodeConfig, Stop};

/// The reserved id of the image batch.
pub const INPUT: &str = "input";
/// The reserved id of the batch's labels (one class per view; a node only when an edge reads it).
pub const LABELS: &str = "labels";

/// A node of the compiled graph. `config` is `None` for `input`.
#[derive(Clone, Debug)]
pub struct GNode {
    pub id: String,
    /// What the node computes: for an `op: ema` node, the config of the node it averages.
    pub config: Option<NodeConfig>,
    /// For an `op: ema` node: what it averages and how (its parameters are not trained).
    pub ema: Option<crate::config::EmaConfig>,
    /// Per-image output shape (`[]` for a loss).
    pub shape: Vec<usize>,
    pub location: Location,
}

impl GNode {
    pub fn is_loss(&self) -> bool {
        self.config.as_ref().is_some_and(NodeConfig::is_loss)
    }
    pub fn is_trainable(&self) -> bool {
        self.ema.is_none() && self.config.as_ref().is_some_and(NodeConfig::is_trainable)
    }
}

/// An edge; `index` is its position under `edges:`.
#[derive(Clone, Debug)]
pub struct GEdge {
    pub index: usize,
    pub stop: Stop,
    /// The consumer's input this edge feeds (`as:`), for a node that takes several.
    pub slot: Option<String>,
    pub location: Location,
}
