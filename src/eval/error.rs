//! What can go wrong while evaluating a run or drawing its figures.

use std::path::PathBuf;

/// Errors of [`crate::eval`].
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    #[error("no node `{node}` in this run's graph (nodes: {known})")]
    UnknownNode { node: String, known: String },
    #[error("`{node}` is a loss; evaluate an encoder or decoder node")]
    LossNode { node: String },
    #[error("the graph has no loss reading an encoder node")]
    NoEncoder,
    #[error("{dataset}: unlabeled data cannot be evaluated")]
    Unlabeled { dataset: String },
    /// Features that do not fit together (a caller's bug or a corrupt cache).
    #[error("{what}: {why}")]
    Shape { what: &'static str, why: String },
    #[error("invalid {what} settings:\n{}", numbered(.problems))]
    Settings { what: &'static str, problems: Vec<String> },
    #[error("linear probe: loss is {loss} at step {step}; lower the learning rate")]
    ProbeDiverged { loss: f64, step: usize },
    #[error("unknown protocol `{0}` (expected `linear` or `knn`)")]
    UnknownProtocol(String),
    #[error("`{0}`: expected LABEL=RUN_DIR")]
    LabelRun(String),
    #[error("{}: not a run directory", .0.display())]
    NotARunDir(PathBuf),
    #[error("{}: {why}", path.display())]
    Metrics { path: PathBuf, why: String },
    #[error("{}: a figure must end in .png or .svg", .0.display())]
    FigureFormat(PathBuf),
    #[error("plot: {0}")]
    Plot(String),
    #[error("cannot serialise the report: {0}")]
    Serialise(String),
}

fn numbered(items: &[String]) -> String {
    items.iter().enumerate().map(|(i, s)| format!("  {}. {s}", i + 1)).collect::<Vec<_>>().join("\n")
}

impl EvalError {
    /// Whether the user asked for something that cannot be (a wrong node, protocol, setting,
    /// file name) rather than the evaluation failing.
    pub fn is_usage(&self) -> bool {
        matches!(
            self,
            EvalError::UnknownNode { .. }
                | EvalError::LossNode { .. }
                | EvalError::Unlabeled { .. }
                | EvalError::Settings { .. }
                | EvalError::UnknownProtocol(_)
                | EvalError::LabelRun(_)
                | EvalError::NotARunDir(_)
                | EvalError::FigureFormat(_)
        )
    }
}
