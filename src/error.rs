//! The library's error type. `anyhow` is used only at the CLI edge (`main.rs`).

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error(transparent)]
    Config(#[from] crate::config::ConfigErrors),
    #[error(transparent)]
    Graph(#[from] crate::graph::GraphErrors),
    #[error(transparent)]
    Data(#[from] crate::data::DataError),
    #[error(transparent)]
    Train(#[from] crate::exec::TrainError),
    /// Boxed: its variants carry several paths, and every `Result` of the crate pays for the
    /// largest variant.
    #[error(transparent)]
    Checkpoint(Box<crate::exec::CheckpointError>),
    #[error(transparent)]
    Eval(#[from] crate::eval::EvalError),
    #[error(transparent)]
    Dist(#[from] crate::dist::DistError),
    #[error(transparent)]
    Stage(#[from] crate::exec::StageError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

pub type Result<T> = std::result::Result<T, Error>;

impl From<crate::exec::CheckpointError> for Error {
    fn from(e: crate::exec::CheckpointError) -> Self {
        Error::Checkpoint(Box::new(e))
    }
}

/// The exit statuses of the `locograph` command (README, "Exit codes").
pub mod exit {
    /// Anything else: I/O, a damaged checkpoint, an internal error.
    pub const OTHER: u8 = 1;
    /// The command line or the experiment is wrong (keys, values, graph, does not fit memory,
    /// a checkpoint of another graph or seed).
    pub const USAGE: u8 = 2;
    /// The dataset is missing, unreadable or does not match the experiment.
    pub const DATA: u8 = 3;
    /// Training diverged (a loss or a parameter is not finite).
    pub const DIVERGED: u8 = 4;
    /// Stopped by Ctrl-C after saving a checkpoint (128 + SIGINT).
    pub const INTERRUPTED: u8 = 130;
}

impl Error {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { path: path.into(), source }
    }

    /// Which of the [`exit`] statuses this error ends the command with.
    pub fn exit_code(&self) -> u8 {
        use crate::exec::{CheckpointError as C, TrainError as T};
        match self {
            Error::Config(_) | Error::Graph(_) => exit::USAGE,
            Error::Data(_) | Error::Train(T::DatasetTooSmall { .. }) => exit::DATA,
            Error::Train(T::Diverged { .. } | T::NonFiniteParameter { .. }) => exit::DIVERGED,
            Error::Train(
                T::CudaNotBuilt
                | T::BatchTooSmallForRanks { .. }
                | T::UnevenShares { .. }
                | T::NoMonitor
                | T::StageParallel,
            ) => exit::USAGE,
            Error::Checkpoint(c)
                if matches!(
                    **c,
                    C::NotARunDir { .. }
                        | C::NoCheckpoint { .. }
                        | C::GraphChanged { .. }
                        | C::SeedChanged { .. }
                        | C::RanksChanged { .. }
                ) =>
            {
                exit::USAGE
            }
            Error::Eval(e) if e.is_usage() => exit::USAGE,
            Error::Stage(
                crate::exec::StageError::NotDeferrable { .. }
                | crate::exec::StageError::DataParallel { .. }
                | crate::exec::StageError::Ranks { .. }
                | crate::exec::StageError::Unsupported { .. },
            ) => exit::USAGE,
            _ => exit::OTHER,
        }
    }
}
