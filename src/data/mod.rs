//! Datasets, augmentations and the loader pipeline.
//!
//! INTERFACE STUB (owned by the data branch; replaced wholesale there).

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{path}: {msg}")]
    Invalid { path: PathBuf, msg: String },
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    pub format: String,
    #[serde(default)]
    pub path: Option<PathBuf>,
}
