//! Runs a compiled graph with candle.

pub mod chain;
pub mod checkpoint;
pub mod engine;
pub mod model;
pub mod reference;
pub mod run_dir;
pub mod train;

pub use engine::{forward_to, run_step, run_step_with, GradsFinal, Hooks, StepOutput};
pub use model::{Model, NodeModule, Piece};
pub use reference::reference_grads;
