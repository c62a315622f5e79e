//! A run directory: everything a run writes, and how to open it again.
//!
//! ```text
//! runs/<name>-<timestamp>/
//!   config.yaml          the resolved experiment (encoder nodes inlined: self-contained)
//!   explain.txt          the reachability table
//!   derived.json         seed, derived values (scaled LR, steps, parameter counts)
//!   metrics.csv          step, lr, one column per loss, images/s
//!   weights.safetensors  every parameter and buffer, keyed by node-id paths
//!   meta.json            name, step, method, the graph's losses
//!   checkpoints/         step-NNNNNNNN/: weights, optimizer state, data position (see
//!                        `exec::checkpoint`); `locograph resume` continues from the newest
//! ```

use std::path::{Path, PathBuf};

use candle_core::Device;

use super::checkpoint::{fsync, write_atomic};
use super::model::Model;
use crate::config::{parse_str, Experiment, Loaded};
use crate::graph::{compile, Compiled};
use crate::{Error, Result};

pub const CONFIG: &str = "config.yaml";
pub const WEIGHTS: &str = "weights.safetensors";
pub const META: &str = "meta.json";
pub const METRICS: &str = "metrics.csv";
pub const EXPLAIN: &str = "explain.txt";
pub const DERIVED: &str = "derived.json";

/// The experiment as a run directory stores it: the encoder's nodes inlined.
pub fn resolved_yaml(exp: &Experiment) -> Result<String> {
    let mut e = exp.clone();
    e.encoder = None;
    serde_yaml::to_string(&e).map_err(|err| Error::Msg(format!("cannot serialise the experiment: {err}")))
}

/// A trained run opened again: its experiment, graph and model with the saved weights.
pub struct OpenRun {
    pub dir: PathBuf,
    pub loaded: Loaded,
    pub compiled: Compiled,
    pub model: Model,
    pub meta: serde_json::Value,
}

/// Reads a run's `config.yaml`, resolving relative paths against the original experiment's
/// folder (recorded in `meta.json`).
pub fn load_config(dir: &Path) -> Result<Loaded> {
    let cfg_path = dir.join(CONFIG);
    let text = std::fs::read_to_string(&cfg_path).map_err(|e| Error::io(&cfg_path, e))?;
    let mut loaded = parse_str(&text, &cfg_path)?;
    // Relative paths in a run's config were written relative to the original experiment.
    if let Some(orig) = std::fs::read_to_string(dir.join(META))
        .ok()
        .and_then(|m| serde_json::from_str::<serde_json::Value>(&m).ok())
        .and_then(|m| m.get("base_dir").and_then(|b| b.as_str()).map(PathBuf::from))
    {
        loaded.base_dir = orig;
    }
    Ok(loaded)
}

/// Opens `dir`, rebuilding the model from `config.yaml` and loading `weights.safetensors`.
/// Errors name the missing or mismatching file and keys; nothing is written.
pub fn open_run(dir: &Path, device: &Device) -> Result<OpenRun> {
    let loaded = load_config(dir)?;
    let compiled = compile(&loaded)?;
    let model = Model::new(&compiled, loaded.experiment.seed, device)?;
    let w = dir.join(WEIGHTS);
    if !w.exists() {
        return Err(Error::Msg(format!("{}: no weights in this run (was it trained?)", w.display())));
    }
    model.params.load_safetensors(&w)?;
    let meta = std::fs::read_to_string(dir.join(META))
        .ok()
        .and_then(|m| serde_json::from_str(&m).ok())
        .unwrap_or(serde_json::Value::Null);
    Ok(OpenRun { dir: dir.to_path_buf(), loaded, compiled, model, meta })
}

/// The method a graph implements, for metadata: `simclr` (one loss, no stops), `gim` (a stop
/// for all losses at every stage input), `loco` (stops naming losses), else `custom`.
pub fn method_name(c: &Compiled) -> &'static str {
    use crate::config::Stop;
    let stops: Vec<&Stop> = c.graph.edge_weights().map(|e| &e.stop).filter(|s| !s.is_none()).collect();
    match (c.reach.losses.len(), stops.is_empty()) {
        (1, true) => "simclr",
        (_, false) if stops.iter().all(|s| matches!(s, Stop::All)) => "gim",
        (_, false) if stops.iter().all(|s| matches!(s, Stop::Losses(_))) => "loco",
        _ => "custom",
    }
}

/// Writes `config.yaml`, `weights.safetensors` and `meta.json` for `model` at `step`.
/// Files are written to a temporary name, fsynced and renamed (and the folder fsynced), so a
/// crash never leaves a torn file. What `resume` reads is the checkpoint, not these files.
pub fn save(dir: &Path, loaded: &Loaded, compiled: &Compiled, model: &Model, step: u64) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let write = |name: &str, bytes: &[u8]| write_atomic(&dir.join(name), bytes);
    write(CONFIG, resolved_yaml(&loaded.experiment)?.as_bytes())?;
    let tmp = dir.join(format!(".{WEIGHTS}.tmp"));
    model.params.save_safetensors(&tmp)?;
    fsync(&tmp)?;
    std::fs::rename(&tmp, dir.join(WEIGHTS)).map_err(|e| Error::io(dir.join(WEIGHTS), e))?;
    fsync(dir)?;
    let losses: Vec<&str> = compiled.losses.iter().map(|&l| compiled.id(l)).collect();
    let base = std::fs::canonicalize(&loaded.base_dir).unwrap_or_else(|_| loaded.base_dir.clone());
    let meta = serde_json::json!({
        "name": loaded.experiment.name,
        "method": method_name(compiled),
        "step": step,
        "losses": losses,
        "base_dir": base,
        "locograph": env!("CARGO_PKG_VERSION"),
    });
    write(META, serde_json::to_string_pretty(&meta).unwrap_or_default().as_bytes())
}
