//! Checkpoints: everything needed to continue a run exactly where it stopped.
//!
//! ```text
//! <run>/checkpoints/step-00000120/
//!   weights.safetensors    every parameter and buffer (BatchNorm statistics), node-id keys
//!   optimizer.safetensors  the optimizer's state tensors (`momentum.<param>`, `exp_avg.<param>`, …)
//!   config.yaml            the resolved experiment the weights belong to
//!   state.json             format version, step, data position, graph hash, sha256 of each file
//! ```
//!
//! The data order and every augmentation are pure functions of `(seed, epoch, image index)`
//! (see `data::loader`) and initialisation is seeded per parameter, so the only "RNG state"
//! to store is the data position: the epoch and the number of batches of it already consumed.
//! The learning rate is a function of the step (the schedule owns it), so it needs no state.
//!
//! # Atomicity
//! A checkpoint is written into `checkpoints/.tmp-step-…/`, every file is fsynced, the folder
//! is renamed to its final name and `checkpoints/` is fsynced. `rename(2)` of a folder is
//! atomic, so a `step-…` folder is either complete or absent: a crash (even SIGKILL or power
//! loss after the rename) never leaves a torn checkpoint, only a `.tmp-*` folder that the
//! next save or resume removes. The previous checkpoint is kept until the new one is
//! durable; the two most recent are kept, so an outside accident to one leaves the other.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::durable::fsync;
use super::error::{CheckpointError, TrainError};
use super::model::Model;
use crate::config::Experiment;
use crate::optim::Optimizer;
use crate::{Error, Result};

/// Bumped whenever the layout or `state.json` changes incompatibly.
pub const FORMAT_VERSION: u32 = 1;
/// The folder of a run directory holding its checkpoints.
pub const DIR: &str = "checkpoints";
pub const WEIGHTS: &str = "weights.safetensors";
pub const OPTIMIZER: &str = "optimizer.safetensors";
pub const CONFIG: &str = "config.yaml";
pub const STATE: &str = "state.json";
/// How many checkpoints stay on disk.
const KEEP: usize = 2;

/// `state.json`: where training stands, and what the files must hash to.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointState {
    /// [`FORMAT_VERSION`] of the writer.
    pub format_version: u32,
    /// Optimizer steps done; the next step to run has this index.
    pub step: u64,
    /// The epoch the next batch comes from.
    pub epoch: u64,
    /// Batches of `epoch` already consumed (they are skipped on resume).
    pub batch_in_epoch: u64,
    /// Length of the run (after any `--steps` override): the schedule depends on it.
    pub total_steps: u64,
    pub seed: u64,
    /// [`graph_hash`] of the experiment the weights were trained with.
    pub graph_hash: String,
    /// Threads candle's kernels ran with: bit-identical resumption needs the same count.
    pub threads: usize,
    /// Ranks of the job (`mpirun -np`); resume needs the same count.
    #[serde(default = "one")]
    pub ranks: usize,
    /// Wall-clock seconds of training before this checkpoint (continues `metrics.csv`'s clock).
    pub elapsed_s: f64,
    /// Each loss at step 0, for the summary printed at the end.
    pub first_losses: Vec<(String, f32)>,
    /// File name → sha256 (hex) of the files beside `state.json`.
    pub files: BTreeMap<String, String>,
    /// Version of the locograph that wrote it.
    pub locograph: String,
}

fn one() -> usize {
    1
}

/// A stable hash of the graph part of an experiment: the input shape, every node's config
/// (sorted by id) and the edges (sorted). Reordering nodes or edges in the file keeps it;
/// changing an op, a width, a stop or an edge changes it. 16 hex digits of a sha256.
pub fn graph_hash(exp: &Experiment) -> String {
    // serde_json writes maps in insertion order, so sort ids first; floats print
    // deterministically (shortest round-trip form).
    let nodes: BTreeMap<&String, serde_json::Value> =
        exp.nodes.iter().map(|(k, v)| (k, serde_json::to_value(v).unwrap_or_default())).collect();
    let mut edges: Vec<String> = exp.edges.iter().map(|e| serde_json::to_string(e).unwrap_or_default()).collect();
    edges.sort();
    let canonical = serde_json::json!({ "input": exp.input, "nodes": nodes, "edges": edges });
    let digest = Sha256::digest(canonical.to_string().as_bytes());
    digest.iter().take(8).map(|b| format!("{b:02x}")).collect()
}

/// Folder name of the checkpoint at `step`; zero-padded so names sort by step.
fn folder_name(step: u64) -> String {
    format!("step-{step:08}")
}

fn sha256_file(path: &Path) -> Result<String> {
    let mut f = File::open(path).map_err(|e| Error::io(path, e))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(|e| Error::io(path, e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// Refuses to checkpoint a model with a NaN or infinite value: a loss can still be finite
/// on the step whose update overflowed, and saving then would replace the last good
/// checkpoint with a broken one.
pub fn check_finite(model: &Model, step: u64) -> Result<()> {
    for (name, t) in model.params.named_tensors() {
        let v = t.flatten_all()?.to_dtype(candle_core::DType::F32)?.to_vec1::<f32>()?;
        if let Some(x) = v.iter().find(|x| !x.is_finite()) {
            return Err(TrainError::NonFiniteParameter { param: name, value: *x, step }.into());
        }
    }
    Ok(())
}

/// Saves a checkpoint of `model` and `optimizer` in `run/checkpoints/` (see the module docs),
/// then removes all but the newest [`KEEP`] checkpoints. Returns the checkpoint's folder.
pub fn save(
    run: &Path,
    exp_yaml: &str,
    model: &Model,
    optimizer: &dyn Optimizer,
    mut state: CheckpointState,
) -> Result<PathBuf> {
    check_finite(model, state.step)?;
    let root = run.join(DIR);
    std::fs::create_dir_all(&root).map_err(|e| Error::io(&root, e))?;
    let name = folder_name(state.step);
    let tmp = root.join(format!(".tmp-{name}"));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    }
    std::fs::create_dir(&tmp).map_err(|e| Error::io(&tmp, e))?;
    model.params.save_safetensors(&tmp.join(WEIGHTS))?;
    let opt: std::collections::HashMap<String, Tensor> = optimizer.state().into_iter().collect();
    candle_core::safetensors::save(&opt, tmp.join(OPTIMIZER))?;
    std::fs::write(tmp.join(CONFIG), exp_yaml).map_err(|e| Error::io(tmp.join(CONFIG), e))?;
    state.files.clear();
    for f in [WEIGHTS, OPTIMIZER, CONFIG] {
        let p = tmp.join(f);
        fsync(&p)?;
        state.files.insert(f.to_string(), sha256_file(&p)?);
    }
    let json = serde_json::to_string_pretty(&state)
        .map_err(|e| CheckpointError::Serialise { what: "the checkpoint state", why: e.to_string() })?;
    std::fs::write(tmp.join(STATE), json).map_err(|e| Error::io(tmp.join(STATE), e))?;
    fsync(&tmp.join(STATE))?;
    fsync(&tmp)?;
    let dest = root.join(&name);
    if dest.exists() {
        // Only possible when resuming re-reaches a step that was checkpointed before the
        // crash; the new one is equal in content, but replace it through a rename anyway.
        let old = root.join(format!(".old-{name}"));
        std::fs::rename(&dest, &old).map_err(|e| Error::io(&dest, e))?;
        std::fs::rename(&tmp, &dest).map_err(|e| Error::io(&dest, e))?;
        std::fs::remove_dir_all(&old).map_err(|e| Error::io(&old, e))?;
    } else {
        std::fs::rename(&tmp, &dest).map_err(|e| Error::io(&dest, e))?;
    }
    fsync(&root)?;
    let all = list(run)?;
    for (_, old) in all.iter().rev().skip(KEEP) {
        std::fs::remove_dir_all(old).map_err(|e| Error::io(old, e))?;
    }
    Ok(dest)
}

/// The complete checkpoints of a run, oldest first, as `(step, folder)`; removes leftovers of
/// interrupted saves (`.tmp-*`, `.old-*`).
pub fn list(run: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let root = run.join(DIR);
    if !root.exists() {
        return Ok(vec![]);
    }
    let mut out = vec![];
    for entry in std::fs::read_dir(&root).map_err(|e| Error::io(&root, e))? {
        let path = entry.map_err(|e| Error::io(&root, e))?.path();
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        if name.starts_with(".tmp-") || name.starts_with(".old-") {
            // A half-written checkpoint from a crash: never complete, safe to drop.
            let _ = std::fs::remove_dir_all(&path);
        } else if let Some(step) = name.strip_prefix("step-").and_then(|s| s.parse::<u64>().ok()) {
            out.push((step, path));
        }
    }
    out.sort();
    Ok(out)
}

/// A checkpoint read back and verified (format version, file hashes), not yet applied.
pub struct Checkpoint {
    pub dir: PathBuf,
    pub state: CheckpointState,
}

/// Reads the newest checkpoint of `run` and verifies its files against their hashes.
/// A damaged checkpoint is refused (never silently skipped), naming the older one if any.
pub fn latest(run: &Path) -> Result<Checkpoint> {
    let all = list(run)?;
    let Some((_, dir)) = all.last() else { return Err(CheckpointError::NoCheckpoint { run: run.into() }.into()) };
    read(dir, all.len() >= 2)
}

/// Reads and verifies one checkpoint folder; `older`: another checkpoint exists before it
/// (named in the error when this one is damaged).
pub fn read(dir: &Path, older: bool) -> Result<Checkpoint> {
    let damaged = |file: &str, why: String| -> Error {
        CheckpointError::Damaged { dir: dir.into(), file: file.into(), why, older }.into()
    };
    let state_path = dir.join(STATE);
    let text = crate::bounded::read_to_string(&state_path, crate::bounded::SMALL)
        .map_err(|e| damaged(STATE, e.to_string()))?;
    // Read the version alone first, so a newer format gets a version message, not a parse error.
    let version = serde_json::from_str::<serde_json::Value>(&text)
        .map_err(|e| damaged(STATE, e.to_string()))?
        .get("format_version")
        .and_then(serde_json::Value::as_u64);
    if version != Some(u64::from(FORMAT_VERSION)) {
        return Err(CheckpointError::FormatVersion { dir: dir.into(), found: version, expected: FORMAT_VERSION }.into());
    }
    let state: CheckpointState = serde_json::from_str(&text).map_err(|e| damaged(STATE, e.to_string()))?;
    for f in [WEIGHTS, OPTIMIZER, CONFIG] {
        let want = state.files.get(f).ok_or_else(|| damaged(STATE, format!("it lists no hash for {f}")))?;
        let p = dir.join(f);
        if !p.exists() {
            return Err(damaged(f, "missing".into()));
        }
        let got = sha256_file(&p)?;
        if &got != want {
            let len = std::fs::metadata(&p).map(|m| m.len()).unwrap_or(0);
            return Err(damaged(
                f,
                format!("does not match its recorded sha256 ({len} bytes: truncated or overwritten?)"),
            ));
        }
    }
    Ok(Checkpoint { dir: dir.to_path_buf(), state })
}

impl Checkpoint {
    /// Loads the weights into `model`, refusing a file whose keys or shapes do not match
    /// the graph (every mismatching key listed), and the optimizer state into `optimizer`.
    pub fn apply(&self, model: &Model, optimizer: &mut dyn Optimizer) -> Result<()> {
        model.params.load_safetensors(&self.dir.join(WEIGHTS))?;
        let path = self.dir.join(OPTIMIZER);
        // candle reads the file whole: a regular file of a bounded size first.
        crate::bounded::open(&path, crate::bounded::MODEL)
            .map_err(|e| CheckpointError::OptimizerState { path: path.clone(), why: format!("cannot read it: {e}") })?;
        let mut state: Vec<(String, Tensor)> = candle_core::safetensors::load(&path, &Device::Cpu)
            .map_err(|e| CheckpointError::OptimizerState { path: path.clone(), why: format!("cannot read it: {e}") })?
            .into_iter()
            .collect();
        // The optimizer keeps its state on the model's device.
        let device = model.params.params.first().map(|p| p.var.device().clone()).unwrap_or(Device::Cpu);
        for (_, t) in state.iter_mut() {
            *t = t.to_device(&device)?;
        }
        state.sort_by(|a, b| a.0.cmp(&b.0));
        optimizer.load_state(&state).map_err(|e| CheckpointError::OptimizerState { path, why: e.to_string() }.into())
    }
}
