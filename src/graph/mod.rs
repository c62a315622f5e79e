//! Graph compilation with petgraph.

#[derive(Debug, thiserror::Error)]
#[error("invalid graph")]
pub struct GraphErrors;
