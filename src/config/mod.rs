//! Strict YAML experiment types.

#[derive(Debug, thiserror::Error)]
#[error("invalid experiment")]
pub struct ConfigErrors;
