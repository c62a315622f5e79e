//! `metrics.csv`: one row per logged step — step, epoch, learning rate, one column per loss
//! (named by the loss node's id), the monitor's column when `monitor:` is on (empty on the
//! rows it was not measured), images/s and the elapsed wall-clock seconds.

use std::io::Write;
use std::path::{Path, PathBuf};

use super::durable::write_atomic;
use crate::graph::Plan;
use crate::{Error, Result};

/// An open `metrics.csv`, appended to.
pub struct Metrics {
    path: PathBuf,
    file: std::fs::File,
    monitor: bool,
}

/// One logged row.
pub struct Row<'a> {
    pub step: u64,
    pub epoch: f64,
    pub lr: f64,
    /// Each loss's value, in `Plan::losses` order.
    pub losses: &'a [(String, f32)],
    /// The monitor's value, when measured at this step.
    pub monitor: Option<f64>,
    pub images_per_sec: f64,
    pub elapsed_s: f64,
}

/// The header line, with its newline; `monitor` is the monitor's column, if any.
pub fn header(plan: &Plan, monitor: Option<&str>) -> String {
    let mut cols: Vec<&str> = plan.losses.iter().map(|&l| plan.id(l)).collect();
    cols.extend(monitor);
    format!("step,epoch,lr,{},images_per_sec,elapsed_s\n", cols.join(","))
}

impl Metrics {
    /// A new file holding only the header.
    pub fn create(path: &Path, plan: &Plan, monitor: Option<&str>) -> Result<Self> {
        let mut file = std::fs::File::create(path).map_err(|e| Error::io(path, e))?;
        file.write_all(header(plan, monitor).as_bytes()).map_err(|e| Error::io(path, e))?;
        Ok(Metrics { path: path.to_path_buf(), file, monitor: monitor.is_some() })
    }

    /// An existing file cut back to its rows up to `step` (the rows past a checkpoint are
    /// logged again by the resumed run; a torn last row, from a crash mid-write, is dropped),
    /// opened for appending.
    pub fn resume(path: &Path, plan: &Plan, monitor: Option<&str>, step: u64) -> Result<Self> {
        let header = header(plan, monitor);
        let text = crate::bounded::read_to_string(path, crate::bounded::METRICS).unwrap_or_default();
        let fields = header.trim_end().split(',').count();
        let mut out = header.clone();
        for line in text.lines().skip(1) {
            let keep = line.split(',').count() == fields
                && line.split(',').next().and_then(|s| s.parse::<u64>().ok()).is_some_and(|s| s <= step);
            if keep {
                out.push_str(line);
                out.push('\n');
            }
        }
        write_atomic(path, out.as_bytes())?;
        let file = std::fs::OpenOptions::new().append(true).open(path).map_err(|e| Error::io(path, e))?;
        Ok(Metrics { path: path.to_path_buf(), file, monitor: monitor.is_some() })
    }

    pub fn write(&mut self, r: &Row<'_>) -> Result<()> {
        let mut vals: Vec<String> = r.losses.iter().map(|(_, v)| format!("{v:.5}")).collect();
        if self.monitor {
            vals.push(r.monitor.map(|v| format!("{v:.5}")).unwrap_or_default());
        }
        let line = format!(
            "{},{:.4},{:.6},{},{:.2},{:.2}\n",
            r.step,
            r.epoch,
            r.lr,
            vals.join(","),
            r.images_per_sec,
            r.elapsed_s
        );
        self.file.write_all(line.as_bytes()).map_err(|e| Error::io(&self.path, e))
    }

    /// On disk before a checkpoint claims their step.
    pub fn sync(&self) -> Result<()> {
        self.file.sync_data().map_err(|e| Error::io(&self.path, e))
    }
}
