//! Evaluation of trained runs, the paper's figures, and encoder profiles.
//!
//! [`features`] (pooled node outputs of the frozen encoder) feed [`linear`] (the linear probe)
//! and [`knn`]; [`report`] runs them on a run directory and writes `eval_<protocol>_<node>.json`.
//! [`tsne`] and [`plot`] draw Fig. 1 (per-decoder loss curves) and Fig. 2 (t-SNE), composed
//! from run directories by [`figures`]. [`profile`] prints the plan's per-stage costs (parameters,
//! FLOPs, activations) beside the paper's table.

pub mod error;
pub mod features;
pub mod figures;
pub mod knn;
pub mod linear;
pub mod monitor;
pub mod plot;
pub mod profile;
pub mod repeats;
pub mod report;
pub mod tsne;

pub use error::EvalError;
pub use profile::{profile, Profile};
