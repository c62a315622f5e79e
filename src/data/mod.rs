//! Datasets, augmentations and the loader pipeline.
//!
//! INTERFACE STUB (owned by the data work; replaced wholesale there).

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{path}: {msg}")]
    Invalid { path: PathBuf, msg: String },
}
