//! Runs a plan with candle: one training step ([`step`], walked by [`engine`]), the training
//! loop around it ([`train`]: [`setup`], [`memory_guard`], [`metrics`], [`checkpoint`],
//! [`run_dir`]), and the naive reference the step is tested against ([`reference`]).

pub mod accounting;
pub mod checkpoint;
pub mod durable;
pub mod ema;
pub mod engine;
pub mod error;
pub mod memory_guard;
pub mod metrics;
pub mod model;
pub mod monitor;
pub mod reference;
pub mod run_dir;
pub mod setup;
pub mod stage;
pub mod stage_train;
pub mod step;
pub mod train;

pub use engine::{forward_to, run_step, run_step_with, Hooks};
pub use error::{CheckpointError, TrainError};
pub use model::{Model, NodeModule};
pub use monitor::{Monitor, MonitorCost};
pub use reference::reference_grads;
pub use setup::validate;
pub use stage::{RankStep, StageError, StageRank};
pub use step::{GradsFinal, StepInput, StepOutput, StepState};
