//! Reading a run directory's `metrics.csv`: the loss curves, the monitor's column and the seed
//! summaries all start from it.

use std::path::Path;

use super::error::EvalError;
use crate::exec::run_dir::METRICS;
use crate::{Error, Result};

/// A run's `metrics.csv`: the header's column names and every row's values (an empty or
/// unreadable cell is NaN). Fails when there is no `step` column.
pub fn read_metrics(dir: &Path) -> Result<(Vec<String>, Vec<Vec<f64>>)> {
    let path = dir.join(METRICS);
    let csv = crate::bounded::read_to_string(&path, crate::bounded::METRICS).map_err(|e| Error::io(&path, e))?;
    let mut lines = csv.lines();
    let header: Vec<String> = lines.next().unwrap_or_default().split(',').map(String::from).collect();
    if !header.iter().any(|h| h == "step") {
        return Err(EvalError::Metrics { path, why: "no `step` column in the header".into() }.into());
    }
    let rows = lines
        .filter(|l| !l.trim().is_empty())
        .map(|l| l.split(',').map(|v| v.trim().parse().unwrap_or(f64::NAN)).collect())
        .collect();
    Ok((header, rows))
}

/// The values of column `name` as `(step, value)`, skipping rows where it is empty.
pub fn column(dir: &Path, name: &str) -> Result<Vec<(f64, f64)>> {
    let (header, rows) = read_metrics(dir)?;
    let at = |n: &str| header.iter().position(|h| h == n);
    let (Some(step), Some(col)) = (at("step"), at(name)) else {
        let path = dir.join(METRICS);
        return Err(EvalError::Metrics { path, why: format!("no `{name}` column (is `monitor:` on?)") }.into());
    };
    Ok(rows.iter().filter_map(|r| Some((*r.get(step)?, *r.get(col)?))).filter(|(_, v)| v.is_finite()).collect())
}
