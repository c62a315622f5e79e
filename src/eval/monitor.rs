//! The `monitor:` section's measurement: a weighted kNN top-1 of the live encoder during
//! pre-training (solo-learn's periodic kNN), and the entry points that train with it.
//!
//! The bank (the first `train_images` of the training split) and the queries (the first
//! `test_images` of the test split) are read and transformed once, with the evaluation
//! transform; every pass runs them through the encoder in eval mode ([`forward_to`]: batch
//! norm reads its running statistics and updates nothing) and votes as [`knn`] does. So a
//! pass costs `train_images + test_images` forward passes and no backward, and it changes
//! nothing the next training step reads.
//!
//! [`forward_to`]: crate::exec::forward_to

use std::path::Path;
use std::sync::Arc;

use petgraph::graph::NodeIndex;

use super::features::{self, Features};
use super::knn::{self, KnnConfig};
use crate::config::{Loaded, MonitorConfig};
use crate::data::{self, Batch, Dataset, Split};
use crate::exec::train::{self, TrainOptions, TrainSummary};
use crate::exec::{run_dir, validate, Model, Monitor};
use crate::graph::Plan;
use crate::Result;

/// The `metrics.csv` column.
pub const COLUMN: &str = "knn_top1";

/// One labelled set, read once.
struct Set {
    ds: Arc<dyn Dataset>,
    batches: Vec<Batch>,
}

/// The kNN monitor of one run.
pub struct KnnMonitor {
    every: u64,
    node: NodeIndex,
    knn: KnnConfig,
    bank: Set,
    queries: Set,
}

impl KnnMonitor {
    /// The monitor `loaded`'s `monitor:` section describes (`None` without one).
    pub fn new(loaded: &Loaded, plan: &Plan) -> Result<Option<KnnMonitor>> {
        let Some(m) = &loaded.experiment.monitor else { return Ok(None) };
        let node = match &m.node {
            Some(n) => features::feature_node(plan, n)?,
            None => features::feature_node(plan, &features::default_node(plan)?)?,
        };
        let set = |split: Split, n: usize| -> Result<Set> {
            let mut cfg = loaded.experiment.data.clone();
            cfg.limit = Some(n);
            let ds = data::open(&cfg, &loaded.base_dir, Some(split))?;
            let batches = features::eval_batches(&ds, &cfg, m.batch_size)?;
            Ok(Set { ds, batches })
        };
        Ok(Some(KnnMonitor {
            every: m.every,
            node,
            knn: knn_config(m),
            bank: set(Split::Train, m.train_images)?,
            queries: set(Split::Test, m.test_images)?,
        }))
    }

    fn features(&self, plan: &Plan, model: &Model, set: &Set) -> Result<Features> {
        features::pooled(plan, model, self.node, &set.ds, set.batches.iter().cloned().map(Ok))
    }
}

fn knn_config(m: &MonitorConfig) -> KnnConfig {
    KnnConfig { k: m.k, temperature: m.temperature, ..KnnConfig::default() }
}

impl Monitor for KnnMonitor {
    fn column(&self) -> &str {
        COLUMN
    }
    fn every(&self) -> u64 {
        self.every
    }
    fn measure(&mut self, plan: &Plan, model: &Model) -> Result<f64> {
        let bank = self.features(plan, model, &self.bank)?;
        let queries = self.features(plan, model, &self.queries)?;
        Ok(knn::knn_quiet(&bank, &queries, &self.knn)?.test_top1)
    }
}

/// Trains `loaded` into a new run directory, with its `monitor:` measured (what `locograph
/// run` does).
pub fn train(loaded: &Loaded, opts: &TrainOptions) -> Result<TrainSummary> {
    // A `placement:` trains stage parallel (which refuses a monitor: it reads the whole encoder).
    if let Some(cfg) = &loaded.experiment.placement {
        return crate::exec::stage_train::train(loaded, cfg, opts);
    }
    // Values and graph first, so a wrong `monitor:` is reported with everything else.
    let plan = validate(loaded)?;
    let mut monitor = KnnMonitor::new(loaded, &plan)?;
    train::train_with(loaded, opts, monitor.as_mut().map(|m| m as &mut dyn Monitor))
}

/// Continues the run in `run` (see [`train::resume`]), measuring its `monitor:` as before.
pub fn resume(run: &Path, opts: &TrainOptions) -> Result<TrainSummary> {
    let loaded = run_dir::load_config(run)?;
    let plan = validate(&loaded)?;
    let mut monitor = KnnMonitor::new(&loaded, &plan)?;
    train::resume_with(&loaded, run, opts, monitor.as_mut().map(|m| m as &mut dyn Monitor))
}
