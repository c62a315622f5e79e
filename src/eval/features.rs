//! Pooled features of a trained run's frozen encoder, for the linear probe, kNN and t-SNE.
//!
//! The encoder is frozen by construction: [`forward_to`] runs in eval mode (BatchNorm uses its
//! running statistics) on detached tensors, and nothing here holds an optimizer. Images come
//! from [`EvalLoader`]: no random augmentation, index order, so two calls give the same numbers.

use std::sync::Arc;

use candle_core::{Device, Tensor};
use petgraph::graph::NodeIndex;

use super::error::EvalError;
use crate::config::NodeConfig;
use crate::data::{self, DataConfig, Dataset, EvalLoader, Split};
use crate::exec::run_dir::OpenRun;
use crate::exec::{forward_to, Model};
use crate::graph::Plan;
use crate::Result;

/// One row of `dim` floats per image, with its label.
#[derive(Debug, Clone, PartialEq)]
pub struct Features {
    /// Row-major `[n, dim]`.
    pub x: Vec<f32>,
    /// Number of images.
    pub n: usize,
    /// Feature width (channels of the node after global average pooling).
    pub dim: usize,
    /// Class of each row.
    pub labels: Vec<u32>,
    /// Number of classes of the dataset.
    pub num_classes: usize,
}

impl Features {
    /// Row `i`.
    pub fn row(&self, i: usize) -> &[f32] {
        &self.x[i * self.dim..(i + 1) * self.dim]
    }

    /// The rows `idx`, in that order.
    pub fn select(&self, idx: &[usize]) -> Features {
        let mut x = Vec::with_capacity(idx.len() * self.dim);
        for &i in idx {
            x.extend_from_slice(self.row(i));
        }
        Features {
            x,
            n: idx.len(),
            dim: self.dim,
            labels: idx.iter().map(|&i| self.labels[i]).collect(),
            num_classes: self.num_classes,
        }
    }

    /// Checks that `x` holds `n × dim` values and every label is below `num_classes`.
    pub fn validate(&self) -> Result<()> {
        if self.x.len() != self.n * self.dim || self.labels.len() != self.n {
            return Err(EvalError::Shape {
                what: "features",
                why: format!(
                    "{} values and {} labels for {} rows of width {}",
                    self.x.len(),
                    self.labels.len(),
                    self.n,
                    self.dim
                ),
            }
            .into());
        }
        if let Some(l) = self.labels.iter().find(|&&l| l as usize >= self.num_classes) {
            return Err(EvalError::Shape {
                what: "features",
                why: format!("label {l} but only {} classes", self.num_classes),
            }
            .into());
        }
        Ok(())
    }
}

/// How to read the images.
#[derive(Debug, Clone)]
pub struct FeatureOptions {
    /// Images per forward pass.
    pub batch_size: usize,
    /// Use only the first N images of the split (replaces the config's `data.limit`).
    pub limit: Option<usize>,
}

impl Default for FeatureOptions {
    fn default() -> Self {
        Self { batch_size: 256, limit: None }
    }
}

/// Global average pool: `[N, C, H, W]` → `[N, C]`; a `[N, D]` vector passes through.
pub fn pool(t: &Tensor) -> Result<Tensor> {
    match t.rank() {
        2 => Ok(t.clone()),
        4 => Ok(t.mean((2, 3))?),
        _ => {
            Err(EvalError::Shape { what: "features", why: format!("cannot pool a tensor of shape {:?}", t.dims()) }
                .into())
        }
    }
}

/// The encoder node a decoder or loss ultimately reads from: walks producers past decoders and
/// losses. `None` for the input.
pub fn encoder_source(c: &Plan, node: NodeIndex) -> Option<NodeIndex> {
    let mut n = node;
    loop {
        if n == c.input {
            return None;
        }
        let g = &c.graph[n];
        if !(g.is_loss() || matches!(g.config, Some(NodeConfig::Decoder(_) | NodeConfig::ImageDecoder(_)))) {
            return Some(n);
        }
        n = c.producer(n)?.1;
    }
}

/// Number of edges from the input to `node` (stage depth, for ordering).
pub fn depth(c: &Plan, node: NodeIndex) -> usize {
    let mut d = 0;
    let mut n = node;
    while let Some((_, p)) = c.producer(n) {
        d += 1;
        n = p;
    }
    d
}

/// The default node to evaluate: the deepest encoder node any loss reads from (`res5` for
/// SimCLR, GIM and LoCo alike), i.e. the encoder's output.
pub fn default_node(c: &Plan) -> Result<String> {
    c.losses
        .iter()
        .filter_map(|&l| encoder_source(c, l))
        .max_by_key(|&n| depth(c, n))
        .map(|n| c.id(n).to_string())
        .ok_or_else(|| EvalError::NoEncoder.into())
}

/// The node `node` names, if it can give features (it exists and is not a loss).
pub fn feature_node(c: &Plan, node: &str) -> Result<NodeIndex> {
    let Some(&idx) = c.ids.get(node) else {
        let known: Vec<&str> = c.ids.keys().map(String::as_str).collect();
        return Err(EvalError::UnknownNode { node: node.into(), known: known.join(", ") }.into());
    };
    if c.graph[idx].is_loss() {
        return Err(EvalError::LossNode { node: node.into() }.into());
    }
    Ok(idx)
}

/// Pooled features of node `node` for `split`, with the run's `data:` section (evaluation
/// transform: no random augmentation).
pub fn extract(run: &OpenRun, node: &str, split: Split, opts: &FeatureOptions) -> Result<Features> {
    let idx = feature_node(&run.plan, node)?;
    let mut cfg = run.loaded.experiment.data.clone();
    if opts.limit.is_some() {
        cfg.limit = opts.limit;
    }
    let ds = data::open(&cfg, &run.loaded.base_dir, Some(split))?;
    let label = format!("features {node} ({split:?})").to_lowercase();
    let bar = crate::progress::bar(ds.len() as u64, "images", &label);
    let batches = EvalLoader::new(ds.clone(), &cfg, opts.batch_size.max(1)).inspect(|b| {
        if let Ok(b) = b {
            bar.inc(b.len() as u64);
        }
    });
    let f = pooled(&run.plan, &run.model, idx, &ds, batches);
    bar.finish_and_clear();
    f
}

/// Pooled features of `idx` for every batch of `batches` (images of `ds`), in eval mode.
pub fn pooled(
    plan: &Plan,
    model: &Model,
    idx: NodeIndex,
    ds: &Arc<dyn Dataset>,
    batches: impl IntoIterator<Item = std::result::Result<data::Batch, data::DataError>>,
) -> Result<Features> {
    let num_classes = ds.num_classes().ok_or_else(|| EvalError::Unlabeled { dataset: ds.name() })?;
    // Where the model is (a run being trained on a GPU is monitored there).
    let device = model.params.params.first().map_or(Device::Cpu, |p| p.var.device().clone());
    let mut x = Vec::new();
    let mut labels = Vec::new();
    let mut dim = 0;
    for batch in batches {
        let batch = batch?;
        let y = pool(&forward_to(plan, model, &batch.to_tensor(&device)?, idx)?)?;
        dim = y.dim(1)?;
        x.extend(y.flatten_all()?.to_dtype(candle_core::DType::F32)?.to_vec1::<f32>()?);
        labels.extend_from_slice(&batch.labels);
    }
    let f = Features { n: labels.len(), x, dim, labels, num_classes };
    f.validate()?;
    Ok(f)
}

/// Every evaluation batch of `ds` under `cfg`'s transform, read once (the monitor reuses
/// them every pass).
pub fn eval_batches(ds: &Arc<dyn Dataset>, cfg: &DataConfig, batch_size: usize) -> Result<Vec<data::Batch>> {
    Ok(EvalLoader::new(ds.clone(), cfg, batch_size.max(1)).collect::<std::result::Result<Vec<_>, _>>()?)
}
