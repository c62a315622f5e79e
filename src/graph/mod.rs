//! Graph compilation with petgraph: build and validate, infer shapes, find which losses reach
//! which nodes (and through which edges), and plan one training step: the execution order of
//! one forward pass with per-loss backwards, and what each node and the whole step cost.

pub mod build;
pub mod explain;
pub mod memory;
pub mod node;
pub mod order;
pub mod placement;
pub mod plan;
pub mod reach;
pub mod shape;

use std::fmt;

pub use build::compile;
pub use memory::{HeldBytes, MemoryEstimate};
pub use node::{GEdge, GNode, INPUT, LABELS};
pub use order::{Action, Order};
pub use placement::{place, Placement, RankCost};
pub use plan::Plan;
pub use reach::{BackwardGroup, Reachability};

use crate::config::Location;

/// One problem in the graph, located at the node or edge that causes it.
#[derive(Clone, Debug, PartialEq)]
pub struct GraphError {
    pub location: Location,
    pub message: String,
}

/// Every problem found in a graph, numbered when shown.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub struct GraphErrors(pub Vec<GraphError>);

impl fmt::Display for GraphErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0.len();
        writeln!(f, "{n} error{} in the graph:", if n == 1 { "" } else { "s" })?;
        for (i, e) in self.0.iter().enumerate() {
            writeln!(f, "  {}. {}: {}", i + 1, e.location, e.message)?;
        }
        Ok(())
    }
}
