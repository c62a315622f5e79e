//! What can go wrong while training, checkpointing, resuming or opening a run. Each variant
//! carries what a user needs to act on it; `crate::Error::exit_code` maps them to the exit
//! statuses documented in the README.

use std::path::PathBuf;

/// Training failures.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("loss `{loss}` is {value} at step {step}: training diverged; stopping (the last checkpoint in {} is kept). Lower the learning rate?", run_dir.display())]
    Diverged { loss: String, value: f32, step: u64, run_dir: PathBuf },
    #[error("parameter `{param}` is {value} after step {step}: training diverged; not saving a checkpoint (the previous one is kept). Lower the learning rate?")]
    NonFiniteParameter { param: String, value: f32, step: u64 },
    #[error("{dataset} has {images} images, fewer than `train.batch_size` ({batch_size}): an epoch would have no full batch")]
    DatasetTooSmall { dataset: String, images: usize, batch_size: usize },
    #[error("`device: cuda` needs a build with `--features cuda` (this binary is CPU-only)")]
    CudaNotBuilt,
    #[error("`train.batch_size` is {batch_size} but the job has {ranks} ranks: every rank needs at least one image of each batch")]
    BatchTooSmallForRanks { batch_size: usize, ranks: usize },
    /// A loss that averages over each rank's own images (all but NT-Xent, which weights the
    /// shares itself) would make the ranks' mean gradient differ from the whole batch's when
    /// the shares are uneven.
    #[error(
        "`train.batch_size` {batch_size} does not split evenly over {ranks} ranks, and loss `{loss}` ({op}) averages over each \
         rank's own images, so the ranks' mean gradient would not be the whole batch's: use a batch size divisible by {ranks}"
    )]
    UnevenShares { batch_size: usize, ranks: usize, loss: String, op: &'static str },
    /// `exec::train::train` got no [`crate::exec::Monitor`] for an experiment with `monitor:`.
    #[error("the experiment has a `monitor:` section, but no monitor was given to the trainer (`eval::monitor::train` builds it)")]
    NoMonitor,
    /// `exec::train::train` got an experiment with `placement:`, which trains stage parallel.
    #[error("the experiment has a `placement:`: it trains stage parallel (`exec::stage_train::train`, what `locograph run` calls)")]
    StageParallel,
}

/// Problems with a run directory or one of its checkpoints.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("{}: not a run directory (no {file})", dir.display())]
    NotARunDir { dir: PathBuf, file: &'static str },
    #[error("{}: no checkpoint in this run (it stopped before its first checkpoint; set `train.checkpoint_every` and start it again with `locograph run`)", run.display())]
    NoCheckpoint { run: PathBuf },
    #[error("{}: no weights in this run (was it trained?)", path.display())]
    NoWeights { path: PathBuf },
    /// `older`: another, older checkpoint exists, which resume would use once this one is moved.
    #[error("checkpoint {} is damaged: {file}: {why}{}", dir.display(), older_hint(dir, *.older))]
    Damaged { dir: PathBuf, file: String, why: String, older: bool },
    #[error("checkpoint {} has format version {}, this locograph reads version {expected}", dir.display(), found.map_or("(none)".to_string(), |v| v.to_string()))]
    FormatVersion { dir: PathBuf, found: Option<u64>, expected: u32 },
    #[error("checkpoint {} was written for graph {was}, but {} describes graph {now}: nodes or edges changed since{}", checkpoint.display(), config.display(), graph_changed_detail(.mismatch))]
    GraphChanged { checkpoint: PathBuf, config: PathBuf, was: String, now: String, mismatch: Option<String> },
    #[error("{}: `seed` is {now} but the checkpoint was trained with seed {was}: the data order would differ", config.display())]
    SeedChanged { config: PathBuf, now: u64, was: u64 },
    #[error("checkpoint {} was written by a job of {was} rank(s), this one has {now}: resume under the same count (mpirun -np {was}); another count splits each batch differently, so the run would not continue the same way", dir.display())]
    RanksChanged { dir: PathBuf, was: usize, now: usize },
    #[error("{}: optimizer state does not fit: {why}", path.display())]
    OptimizerState { path: PathBuf, why: String },
    #[error("cannot write {what}: {why}")]
    Serialise { what: &'static str, why: String },
}

fn older_hint(dir: &std::path::Path, older: bool) -> String {
    if older {
        format!("; to resume from the previous checkpoint instead, move {} out of the way", dir.display())
    } else {
        String::new()
    }
}

fn graph_changed_detail(mismatch: &Option<String>) -> String {
    match mismatch {
        Some(m) => format!("\n{m}"),
        None => " (the parameter names and shapes still fit, but the routing would differ: not the same run)".into(),
    }
}
