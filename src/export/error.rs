//! What can go wrong while exporting or verifying an encoder.

use std::path::PathBuf;

/// Errors of [`crate::export`]. Convert with `?` into `anyhow` at the CLI edge.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error(transparent)]
    Locograph(#[from] crate::Error),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("unknown output `{name}`; the encoder exports: {available}")]
    UnknownOutput { name: String, available: String },
    #[error("the graph has no encoder nodes (stem or stage fed by the input)")]
    NoEncoder,
    #[error("parameter `{name}` has {count} non-finite values: the weights are corrupt")]
    NonFinite { name: String, count: usize },
    #[error("parameter `{0}` is missing from the model")]
    MissingParam(String),
    #[error("the graph is not a torchvision ResNet:\n{}", numbered(.0))]
    NotResnet(Vec<String>),
    #[error("ONNX Runtime is not available: {0}")]
    NoRuntime(String),
    #[error("ONNX Runtime: {0}")]
    Runtime(String),
    #[error("{path}: {message}")]
    BadModel { path: PathBuf, message: String },
    #[error("ONNX and candle disagree (tolerance {tolerance:e}):\n{}", numbered(.diffs))]
    Mismatch { tolerance: f32, diffs: Vec<String> },
}

fn numbered(items: &[String]) -> String {
    items.iter().enumerate().map(|(i, s)| format!("  {}. {s}", i + 1)).collect::<Vec<_>>().join("\n")
}

/// The result type of [`crate::export`].
pub type Result<T> = std::result::Result<T, ExportError>;

impl ExportError {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        ExportError::Io { path: path.into(), source }
    }
}
