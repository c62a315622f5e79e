//! The hook through which training measures the live model every few steps (`monitor:`).
//! The trainer only calls it; what is measured is built outside exec (`eval::monitor`: a kNN
//! accuracy), so exec needs nothing of eval.

use super::model::Model;
use crate::graph::Plan;
use crate::Result;

/// A measurement of the model during training.
pub trait Monitor {
    /// Its `metrics.csv` column (`knn_top1`).
    fn column(&self) -> &str;
    /// Steps between measurements (also taken after the last step).
    fn every(&self) -> u64;
    /// Measures `model`, leaving it as it was (eval mode, no gradients, no statistics updated:
    /// a resumed run stays bit-identical).
    fn measure(&mut self, plan: &Plan, model: &Model) -> Result<f64>;
}

/// What monitoring cost a run: `passes` measurements taking `seconds` in all, beside the
/// training steps' own time.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct MonitorCost {
    pub passes: u64,
    pub seconds: f64,
    /// Mean seconds of a training step in the same run.
    pub step_seconds: f64,
}

impl MonitorCost {
    /// Seconds per measurement.
    pub fn per_pass(&self) -> f64 {
        self.seconds / self.passes.max(1) as f64
    }
}
