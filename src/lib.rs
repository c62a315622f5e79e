//! locograph: local contrastive representation learning as YAML graphs.
//!
//! The layout follows the data flow: [`config`] (strict YAML types) → [`graph`] (petgraph:
//! validate, infer shapes, gradient reachability, schedule) → [`exec`] (runs a schedule with
//! candle). Beside them: [`nn`] (layers), [`loss`], [`optim`], [`data`], [`eval`], [`export`].

pub mod bounded;
pub mod config;
pub mod cpu_slice;
pub mod data;
pub mod dist;
pub mod dnnl;
pub mod error;
pub mod eval;
pub mod exec;
pub mod export;
pub mod graph;
pub mod loss;
pub mod malloc;
pub mod nn;
pub mod optim;
pub mod parity;
pub mod progress;
pub mod simd;

pub use error::{Error, Result};
