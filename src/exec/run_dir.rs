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

use super::durable::{fsync, write_atomic};
use super::error::CheckpointError;
use super::model::Model;
use crate::config::{parse_str, Experiment, Loaded};
use crate::graph::{compile, Plan};
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
    serde_yaml::to_string(&e)
        .map_err(|err| CheckpointError::Serialise { what: "the experiment", why: err.to_string() }.into())
}

/// Where a run's directory goes: `cli` (`--runs-dir`, relative to the working directory),
/// else `train.runs_dir` (relative to the experiment file, like every path in it), else
/// `runs/` in the working directory.
pub fn root(loaded: &Loaded, cli: Option<&Path>) -> PathBuf {
    match (cli, &loaded.experiment.train.runs_dir) {
        (Some(c), _) => c.to_path_buf(),
        (None, Some(r)) => loaded.base_dir.join(r),
        (None, None) => PathBuf::from("runs"),
    }
}

/// A new run directory's name: `<root>/<name>-YYYYmmdd-HHMMSS` (UTC), with `-2`, `-3`, …
/// added when a run of the same name started in the same second.
pub fn new_dir(root: &Path, name: &str) -> PathBuf {
    let base = format!("{name}-{}", timestamp());
    let mut dir = root.join(&base);
    let mut n = 1;
    while dir.exists() {
        n += 1;
        dir = root.join(format!("{base}-{n}"));
    }
    dir
}

/// `YYYYmmdd-HHMMSS` in UTC, without a date-time dependency.
fn timestamp() -> String {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil-from-days (H. Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}{m:02}{d:02}-{:02}{:02}{:02}", rem / 3600, rem % 3600 / 60, rem % 60)
}

/// Refuses a folder that is not a run directory (no `config.yaml`).
pub fn check(dir: &Path) -> Result<()> {
    if dir.join(CONFIG).is_file() {
        Ok(())
    } else {
        Err(CheckpointError::NotARunDir { dir: dir.into(), file: CONFIG }.into())
    }
}

/// A trained run opened again: its experiment, graph and model with the saved weights.
pub struct OpenRun {
    pub dir: PathBuf,
    pub loaded: Loaded,
    pub plan: Plan,
    pub model: Model,
    pub meta: serde_json::Value,
}

/// Reads a run's `config.yaml`, resolving relative paths against the original experiment's
/// folder (recorded in `meta.json`).
pub fn load_config(dir: &Path) -> Result<Loaded> {
    check(dir)?;
    let cfg_path = dir.join(CONFIG);
    let text = crate::bounded::read_to_string(&cfg_path, crate::bounded::SMALL).map_err(|e| Error::io(&cfg_path, e))?;
    let mut loaded = parse_str(&text, &cfg_path)?;
    // Relative paths in a run's config were written relative to the original experiment.
    if let Some(orig) = crate::bounded::read_to_string(&dir.join(META), crate::bounded::SMALL)
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
    let plan = compile(&loaded)?;
    let model = Model::new(&plan, loaded.experiment.seed, device)?;
    let w = dir.join(WEIGHTS);
    if !w.exists() {
        return Err(CheckpointError::NoWeights { path: w }.into());
    }
    model.params.load_safetensors(&w)?;
    let meta = crate::bounded::read_to_string(&dir.join(META), crate::bounded::SMALL)
        .ok()
        .and_then(|m| serde_json::from_str(&m).ok())
        .unwrap_or(serde_json::Value::Null);
    Ok(OpenRun { dir: dir.to_path_buf(), loaded, plan, model, meta })
}

/// The method a graph implements, for metadata: `simclr` (one loss, no stops), `gim` (a stop
/// for all losses at every stage input), `loco` (stops naming losses), else `custom`.
pub fn method_name(c: &Plan) -> &'static str {
    use crate::config::Stop;
    let stops: Vec<&Stop> = c.graph.edge_weights().map(|e| &e.stop).filter(|s| !s.is_none()).collect();
    // The three names are NT-Xent methods; other losses (DGL, InfoPro, SimSiam, BYOL) are custom.
    let contrastive =
        c.reach.losses.iter().all(|&l| matches!(c.graph[l].config, Some(crate::config::NodeConfig::NtXent(_))));
    match (c.reach.losses.len(), stops.is_empty()) {
        _ if !contrastive => "custom",
        (1, true) => "simclr",
        (_, false) if stops.iter().all(|s| matches!(s, Stop::All)) => "gim",
        (_, false) if stops.iter().all(|s| matches!(s, Stop::Losses(_))) => "loco",
        _ => "custom",
    }
}

/// Writes `config.yaml`, `weights.safetensors` and `meta.json` for `model` at `step`.
/// Files are written to a temporary name, fsynced and renamed (and the folder fsynced), so a
/// crash never leaves a torn file. What `resume` reads is the checkpoint, not these files.
pub fn save(dir: &Path, loaded: &Loaded, plan: &Plan, model: &Model, step: u64) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let write = |name: &str, bytes: &[u8]| write_atomic(&dir.join(name), bytes);
    write(CONFIG, resolved_yaml(&loaded.experiment)?.as_bytes())?;
    let tmp = dir.join(format!(".{WEIGHTS}.tmp"));
    model.params.save_safetensors(&tmp)?;
    fsync(&tmp)?;
    std::fs::rename(&tmp, dir.join(WEIGHTS)).map_err(|e| Error::io(dir.join(WEIGHTS), e))?;
    fsync(dir)?;
    let losses: Vec<&str> = plan.losses.iter().map(|&l| plan.id(l)).collect();
    let base = std::fs::canonicalize(&loaded.base_dir).unwrap_or_else(|_| loaded.base_dir.clone());
    let meta = serde_json::json!({
        "name": loaded.experiment.name,
        "method": method_name(plan),
        "step": step,
        "losses": losses,
        "base_dir": base,
        "locograph": env!("CARGO_PKG_VERSION"),
    });
    write(META, serde_json::to_string_pretty(&meta).unwrap_or_default().as_bytes())
}
