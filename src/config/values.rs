//! The values of an experiment, checked once the loader has checked keys and types: ranges,
//! combinations that cannot work together, and what this build can run. Every problem at once,
//! each located.

use super::experiment::{DeviceKind, Precision};
use super::{ConfigError, ConfigErrors, Loaded};

/// Checks the values of every section (types were checked by the loader); all problems at once.
pub fn check_values(loaded: &Loaded) -> Result<(), ConfigErrors> {
    let e = &loaded.experiment;
    let at = |path: &str, message: String| {
        loaded.attribute(ConfigError { location: loaded.locations.path(path), path: path.to_string(), message })
    };
    let mut errors = vec![];
    if let Err(err) = e.data.validate() {
        errors.push(at("data", err.to_string()));
    }
    errors.extend(e.optimizer.validate().into_iter().map(|m| at("optimizer", m)));
    errors.extend(e.schedule.validate().into_iter().map(|m| at("schedule", m)));
    let t = &e.train;
    if t.batch_size < 2 {
        errors.push(at("train.batch_size", format!("needs at least 2 images (got {})", t.batch_size)));
    }
    match (t.steps, t.epochs) {
        (Some(_), Some(_)) => errors.push(at("train", "give `steps` or `epochs`, not both".into())),
        (None, None) => errors.push(at("train", "give `steps` or `epochs`".into())),
        (Some(0), _) | (_, Some(0)) => errors.push(at("train", "the run must be at least 1 step long".into())),
        _ => {}
    }
    if t.checkpoint_every == Some(0) {
        errors.push(at(
            "train.checkpoint_every",
            "must be at least 1 (leave it out for a checkpoint at the end only)".into(),
        ));
    }
    if t.log_every == 0 {
        errors.push(at("train.log_every", "must be at least 1".into()));
    }
    if t.threads == Some(0) {
        errors.push(at("train.threads", "must be at least 1 (leave it out for one per core)".into()));
    }
    if let Some(m) = &e.monitor {
        errors.extend(m.problems(t.log_every).into_iter().map(|(key, why)| at(&format!("monitor.{key}"), why)));
    }
    if e.device == DeviceKind::Cuda && !cfg!(feature = "cuda") {
        errors
            .push(at("device", "`device: cuda` needs a build with `--features cuda` (this binary is CPU-only)".into()));
    }
    if e.precision == Precision::Bf16 && e.device == DeviceKind::Cpu && !crate::dnnl::enabled() {
        let why = if crate::dnnl::built() {
            "oneDNN's kernels are switched off (LOCOGRAPH_DNNL=0)"
        } else {
            "this build has none (`apt-get install libdnnl-dev`, then rebuild)"
        };
        errors.push(at(
            "precision",
            format!("`precision: bf16` on CPU needs oneDNN's kernels: {why}; or `device: cuda`; `f16` runs on CPU without them"),
        ));
    }
    if e.input.channels == 0 || e.input.size == 0 {
        errors.push(at("input", "channels and size must be at least 1".into()));
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(ConfigErrors(errors))
    }
}
