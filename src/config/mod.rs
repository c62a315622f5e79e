//! Strict YAML experiment types and their loader.
//!
//! Every type here is `deny_unknown_fields`; [`load`] reports *all* errors of a file at once,
//! each with file, line, column and YAML path.

pub mod edge;
pub mod experiment;
pub mod load;
pub mod location;
pub mod monitor;
pub mod node;
pub mod overrides;
pub mod placement;
pub mod values;

use std::fmt;

pub use edge::{EdgeConfig, Stop};
pub use experiment::{DeviceKind, Experiment, GraphFile, InputConfig, Precision, TrainConfig};
pub use load::{load, load_with, parse_str, parse_with, Loaded, Locations};
pub use location::{Location, SpanIndex};
pub use monitor::MonitorConfig;
pub use node::{CrossEntropyConfig, EmaConfig, Inputs, MseConfig, NegCosineConfig, NodeConfig, NtXentConfig};
pub use overrides::Override;
pub use placement::{Balance, PipelineSchedule, PlacementConfig};
pub use values::check_values;

/// One problem in an experiment file.
#[derive(Clone, Debug, PartialEq)]
pub struct ConfigError {
    pub location: Location,
    /// YAML path, e.g. `nodes.res3.blocks` (empty for the whole document).
    pub path: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            write!(f, "{}: {}", self.location, self.message)
        } else {
            write!(f, "{}: at `{}`: {}", self.location, self.path, self.message)
        }
    }
}

/// Every problem found in a file, numbered when shown.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0.len();
        writeln!(f, "{n} error{} in the experiment:", if n == 1 { "" } else { "s" })?;
        for (i, e) in self.0.iter().enumerate() {
            writeln!(f, "  {}. {e}", i + 1)?;
        }
        Ok(())
    }
}
