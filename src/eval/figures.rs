//! The paper's figures, made from run directories.
//!
//! - Supplementary Fig. 1: training-loss curves, one panel per encoder stage a decoder reads
//!   from, the runs overlaid. Decoders are matched across methods by *stage*, not by loss id:
//!   the decoder on res3 is `L1` in LoCo and `L3` in GIM, so each curve is placed by walking
//!   the run's graph from the loss back to the encoder node it reads.
//! - Supplementary Fig. 2: t-SNE of the test embeddings of 500 images from 10 classes (the
//!   first 50 of each class in the test split), one panel per run.

use std::path::{Path, PathBuf};

use candle_core::Device;

use super::error::EvalError;
use super::features::{self, FeatureOptions, Features};
use super::metrics_file::{column, read_metrics};
use super::plot::{self, Format, LinePanel, ScatterPanel, Series};
use super::tsne::{self, TsneConfig};
use crate::config::parse_str;
use crate::data::Split;
use crate::exec::run_dir::{open_run, OpenRun, CONFIG, METRICS};
use crate::graph::compile;
use crate::{Error, Result};

/// Fashion-MNIST's class names, in label order.
pub const FASHION_MNIST_CLASSES: [&str; 10] =
    ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"];

/// Parses a command-line `LABEL=RUN_DIR` pair (a bare `RUN_DIR` is labelled by its folder name).
pub fn label_run(arg: &str) -> Result<(String, PathBuf)> {
    let (label, dir) = match arg.split_once('=') {
        Some((l, d)) => (l.trim().to_string(), PathBuf::from(d)),
        None => {
            let d = PathBuf::from(arg);
            let name = d.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| arg.to_string());
            (name, d)
        }
    };
    if label.is_empty() || dir.as_os_str().is_empty() {
        return Err(EvalError::LabelRun(arg.into()).into());
    }
    if !dir.is_dir() {
        return Err(EvalError::NotARunDir(dir).into());
    }
    Ok((label, dir))
}

/// One loss's curve from `metrics.csv`, with the encoder stage its decoder reads.
#[derive(Debug, Clone, PartialEq)]
pub struct LossCurve {
    /// Loss node id (the `metrics.csv` column).
    pub loss: String,
    /// Encoder node the loss's decoder reads (`res3`).
    pub stage: String,
    /// Edges from the input to `stage` (orders the panels shallow to deep).
    pub depth: usize,
    /// `(step, loss)`.
    pub points: Vec<(f64, f64)>,
}

/// A run's loss curves and its legend label.
#[derive(Debug, Clone, PartialEq)]
pub struct LossRun {
    pub label: String,
    pub curves: Vec<LossCurve>,
}

/// Reads `metrics.csv` and the graph in `config.yaml` of a run directory (no weights needed).
pub fn read_loss_run(dir: &Path, label: &str) -> Result<LossRun> {
    let cfg_path = dir.join(CONFIG);
    let text = crate::bounded::read_to_string(&cfg_path, crate::bounded::SMALL).map_err(|e| Error::io(&cfg_path, e))?;
    let c = compile(&parse_str(&text, &cfg_path)?)?;
    let path = dir.join(METRICS);
    let (header, rows) = read_metrics(dir)?;
    let step_col = header.iter().position(|h| h == "step").unwrap_or(0);
    let mut curves = vec![];
    for &l in &c.losses {
        let id = c.id(l);
        let Some(col) = header.iter().position(|h| h == id) else {
            return Err(EvalError::Metrics { path: path.clone(), why: format!("no column for loss `{id}`") }.into());
        };
        let Some(src) = features::encoder_source(&c, l) else { continue };
        let points = rows.iter().filter_map(|r| Some((*r.get(step_col)?, *r.get(col)?))).collect();
        curves.push(LossCurve {
            loss: id.to_string(),
            stage: c.id(src).to_string(),
            depth: features::depth(&c, src),
            points,
        });
    }
    Ok(LossRun { label: label.to_string(), curves })
}

/// Exponential moving average of the `y` values, debiased as TensorBoard's smoothing slider
/// (`smoothing` in [0, 1); 0 = the raw values). Per-step contrastive losses are noisy at small
/// batches; the smoothed curve shows the trend the paper's figure compares. Non-finite values
/// are passed through and do not enter the average.
pub fn smooth(points: &[(f64, f64)], smoothing: f64) -> Vec<(f64, f64)> {
    if smoothing <= 0.0 || smoothing.is_nan() {
        return points.to_vec();
    }
    let a = smoothing.min(0.999);
    let (mut avg, mut weight) = (0.0, 0.0);
    points
        .iter()
        .map(|&(x, y)| {
            if !y.is_finite() {
                return (x, y);
            }
            avg = a * avg + (1.0 - a) * y;
            weight = a * weight + (1.0 - a);
            (x, avg / weight)
        })
        .collect()
}

/// One panel per stage (shallow to deep), one series per run with a decoder there, named
/// `label (loss id)`; a run keeps its colour in every panel. `smoothing`: see [`smooth`].
pub fn loss_panels(runs: &[LossRun], smoothing: f64) -> Vec<LinePanel> {
    let mut stages: Vec<(usize, String)> =
        runs.iter().flat_map(|r| r.curves.iter().map(|c| (c.depth, c.stage.clone()))).collect();
    stages.sort();
    stages.dedup();
    stages
        .into_iter()
        .map(|(_, stage)| LinePanel {
            title: format!("decoder on {stage}"),
            x_label: "step".into(),
            y_label: "NT-Xent loss".into(),
            series: runs
                .iter()
                .enumerate()
                .flat_map(|(i, r)| {
                    r.curves.iter().filter(|c| c.stage == stage).map(move |c| Series {
                        name: format!("{} ({})", r.label, c.loss),
                        color: i,
                        points: smooth(&c.points, smoothing),
                    })
                })
                .collect(),
        })
        .collect()
}

/// Fig. 1 from `(label, run dir)` pairs, written to each of `outs` (`.png` / `.svg`);
/// `smoothing` in [0, 1) (0 = raw; 0.6 reads well for a few hundred logged rows).
pub fn loss_curves(runs: &[(String, PathBuf)], smoothing: f64, outs: &[PathBuf]) -> Result<()> {
    let runs: Vec<LossRun> = runs.iter().map(|(l, d)| read_loss_run(d, l)).collect::<Result<_>>()?;
    let panels = loss_panels(&runs, smoothing);
    let title = if smoothing > 0.0 {
        format!("Training loss of each decoder (EMA {smoothing})")
    } else {
        "Training loss of each decoder".to_string()
    };
    for out in outs {
        let bytes = plot::line_figure(&title, &panels, 2, Format::from_path(out)?)?;
        plot::save(out, &bytes)?;
    }
    Ok(())
}

/// The online kNN curve (`knn_top1`, from `monitor:`) of each `(label, dir)`: a run directory,
/// or a seed group (`run --seeds`), drawn as the mean over its runs at each step they share.
pub fn monitor_curves(runs: &[(String, PathBuf)], outs: &[PathBuf]) -> Result<()> {
    let mut series = vec![];
    for (i, (label, dir)) in runs.iter().enumerate() {
        let dirs = if super::repeats::is_group(dir) { super::repeats::group_runs(dir)? } else { vec![dir.clone()] };
        let curves = dirs.iter().map(|d| column(d, super::monitor::COLUMN)).collect::<Result<Vec<_>>>()?;
        let n = curves.len();
        // The steps every run measured, with the mean of the runs there.
        let points: Vec<(f64, f64)> = curves
            .first()
            .map(|c| c.iter().map(|p| p.0).collect::<Vec<_>>())
            .unwrap_or_default()
            .into_iter()
            .filter_map(|step| {
                let at: Vec<f64> =
                    curves.iter().filter_map(|c| c.iter().find(|p| p.0 == step).map(|p| 100.0 * p.1)).collect();
                (at.len() == n).then(|| (step, at.iter().sum::<f64>() / n as f64))
            })
            .collect();
        let name = if n > 1 { format!("{label} (mean of {n} seeds)") } else { label.clone() };
        series.push(Series { name, color: i, points });
    }
    let panel = LinePanel { title: String::new(), x_label: "step".into(), y_label: "kNN top-1 (%)".into(), series };
    for out in outs {
        let bytes = plot::line_figure(
            "Online kNN accuracy during pre-training",
            std::slice::from_ref(&panel),
            1,
            Format::from_path(out)?,
        )?;
        plot::save(out, &bytes)?;
    }
    Ok(())
}

/// Settings of the t-SNE figure.
#[derive(Debug, Clone)]
pub struct TsneFigureOptions {
    /// Node to embed; `None` = the encoder output.
    pub node: Option<String>,
    /// Classes `0..classes` of the test split...
    pub classes: usize,
    /// ...and the first `per_class` images of each.
    pub per_class: usize,
    pub tsne: TsneConfig,
}

impl Default for TsneFigureOptions {
    fn default() -> Self {
        Self { node: None, classes: 10, per_class: 50, tsne: TsneConfig::default() }
    }
}

/// Test features of the first `per_class` images of each class.
pub fn tsne_features(run: &OpenRun, node: &str, classes: usize, per_class: usize) -> Result<Features> {
    // Classes are interleaved in the usual test splits: a few times the sample size nearly
    // always suffices; read the whole split only if it does not.
    let mut limit = Some(classes * per_class * 4);
    loop {
        let f = features::extract(run, node, Split::Test, &FeatureOptions { batch_size: 256, limit })?;
        let idx = tsne::first_per_class(&f.labels, classes, per_class);
        if idx.len() == classes * per_class || limit.is_none_or(|l| f.n < l) {
            return Ok(f.select(&idx));
        }
        limit = None;
    }
}

/// Class names for a run's dataset: Fashion-MNIST's when the data path says so, else none
/// (the plot writes `class k`).
pub fn class_names(run: &OpenRun) -> Vec<String> {
    let path = run.loaded.experiment.data.path.as_deref().map(|p| p.to_string_lossy().to_lowercase());
    if path.is_some_and(|p| p.contains("fashion")) {
        FASHION_MNIST_CLASSES.iter().map(|s| s.to_string()).collect()
    } else {
        vec![]
    }
}

/// Fig. 2 from `(label, run dir)` pairs: one t-SNE panel per run, written to each of `outs`.
pub fn tsne_figure(runs: &[(String, PathBuf)], opts: &TsneFigureOptions, outs: &[PathBuf]) -> Result<()> {
    let mut panels = vec![];
    let mut names = vec![];
    for (label, dir) in runs {
        let run = open_run(dir, &Device::Cpu)?;
        let node = match &opts.node {
            Some(n) => n.clone(),
            None => features::default_node(&run.plan)?,
        };
        let f = tsne_features(&run, &node, opts.classes, opts.per_class)?;
        let points = tsne::tsne(&f.x, f.n, f.dim, &opts.tsne)?;
        panels.push(ScatterPanel { title: format!("{label} ({node})"), points, labels: f.labels });
        if names.is_empty() {
            names = class_names(&run);
        }
    }
    let n = opts.classes * opts.per_class;
    for out in outs {
        let title = format!("t-SNE of {n} test embeddings");
        let bytes = plot::scatter_figure(&title, &panels, &names, Format::from_path(out)?)?;
        plot::save(out, &bytes)?;
    }
    Ok(())
}
