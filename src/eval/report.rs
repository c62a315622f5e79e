//! Evaluates a run directory and writes `RUN/eval_<protocol>_<node>.json`.
//!
//! The report carries the settings next to the number, so a table in `docs/results.md` can be
//! traced back to exactly how it was measured.

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::Device;

use super::error::EvalError;
use super::features::{self, FeatureOptions, Features};
use super::knn::{self, KnnConfig};
use super::linear::{self, LinearConfig};
use crate::data::Split;
use crate::exec::run_dir::{open_run, OpenRun};
use crate::{Error, Result};

/// An evaluation protocol with its settings.
#[derive(Debug, Clone, PartialEq)]
pub enum Protocol {
    Linear(LinearConfig),
    Knn(KnnConfig),
}

impl Protocol {
    /// `linear` or `knn` (the file-name part).
    pub fn name(&self) -> &'static str {
        match self {
            Protocol::Linear(_) => "linear",
            Protocol::Knn(_) => "knn",
        }
    }

    /// A protocol by name with default settings.
    pub fn from_name(name: &str) -> Result<Protocol> {
        match name {
            "linear" => Ok(Protocol::Linear(LinearConfig::default())),
            "knn" => Ok(Protocol::Knn(KnnConfig::default())),
            _ => Err(EvalError::UnknownProtocol(name.into()).into()),
        }
    }
}

/// What to evaluate and on how many images.
#[derive(Debug, Clone, Default)]
pub struct EvalOptions {
    /// Node whose pooled output is the representation; `None` = the encoder output
    /// ([`features::default_node`]).
    pub node: Option<String>,
    /// Images per forward pass (0 = 256).
    pub batch_size: usize,
    /// Use only the first N training images (quick checks); `None` = the config's `data.limit`.
    pub train_limit: Option<usize>,
    /// Use only the first N test images; `None` = the config's `data.limit`.
    pub test_limit: Option<usize>,
}

/// `RUN/eval_<protocol>_<node>.json`.
pub fn report_path(run_dir: &Path, protocol: &str, node: &str) -> PathBuf {
    run_dir.join(format!("eval_{protocol}_{node}.json"))
}

/// Train and test features of `node` (see [`EvalOptions`]).
pub fn split_features(run: &OpenRun, node: &str, opts: &EvalOptions) -> Result<(Features, Features)> {
    let batch_size = if opts.batch_size == 0 { 256 } else { opts.batch_size };
    let train = features::extract(run, node, Split::Train, &FeatureOptions { batch_size, limit: opts.train_limit })?;
    let test = features::extract(run, node, Split::Test, &FeatureOptions { batch_size, limit: opts.test_limit })?;
    Ok((train, test))
}

/// Opens `run_dir`, extracts features once, runs every protocol and writes one report each.
/// Returns `(path, report)` per protocol, in order.
pub fn evaluate_run(
    run_dir: &Path,
    protocols: &[Protocol],
    opts: &EvalOptions,
) -> Result<Vec<(PathBuf, serde_json::Value)>> {
    let run = open_run(run_dir, &Device::Cpu)?;
    let node = match &opts.node {
        Some(n) => n.clone(),
        None => features::default_node(&run.plan)?,
    };
    let t0 = Instant::now();
    let (train, test) = split_features(&run, &node, opts)?;
    let feature_seconds = t0.elapsed().as_secs_f64();
    let mut out = vec![];
    for p in protocols {
        let t = Instant::now();
        let (settings, result) = match p {
            Protocol::Linear(cfg) => (to_json(cfg)?, to_json(&linear::probe(&train, &test, cfg)?)?),
            Protocol::Knn(cfg) => (to_json(cfg)?, to_json(&knn::knn(&train, &test, cfg)?)?),
        };
        let report = serde_json::json!({
            "run": run.dir,
            "name": run.meta.get("name"),
            "method": run.meta.get("method"),
            "step": run.meta.get("step"),
            "node": node,
            "protocol": p.name(),
            "frozen_encoder": true,
            "features": {
                "pooling": "global average pool of the node output (eval mode)",
                "dim": train.dim,
                "train_size": train.n,
                "test_size": test.n,
                "seconds": feature_seconds,
            },
            "settings": settings,
            "result": result,
            "seconds": t.elapsed().as_secs_f64(),
            "locograph": env!("CARGO_PKG_VERSION"),
        });
        let path = report_path(run_dir, p.name(), &node);
        let text = serde_json::to_string_pretty(&report).map_err(|e| EvalError::Serialise(e.to_string()))?;
        std::fs::write(&path, text + "\n").map_err(|e| Error::io(&path, e))?;
        out.push((path, report));
    }
    Ok(out)
}

/// One line for the terminal: `linear res5: top-1 87.12 % (run …)`.
pub fn summary(path: &Path, report: &serde_json::Value) -> String {
    let top1 = report["result"]["test_top1"].as_f64().map_or("?".to_string(), |t| format!("{:.2} %", 100.0 * t));
    let protocol = report["protocol"].as_str().unwrap_or("?");
    let node = report["node"].as_str().unwrap_or("?");
    format!("{protocol} {node}: top-1 {top1} ({})", path.display())
}

fn to_json<T: serde::Serialize>(v: &T) -> Result<serde_json::Value> {
    serde_json::to_value(v).map_err(|e| EvalError::Serialise(e.to_string()).into())
}
