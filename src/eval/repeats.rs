//! Seed repeats: `locograph run --seeds 0,1,2` trains one run per seed into one folder, and
//! the folder's `summary.json` holds the mean ± sample standard deviation (n − 1) of what the
//! runs measured: each `metrics.csv` column at the end (every loss, the online kNN accuracy of
//! `monitor:`), and each evaluation report found in the runs. `locograph eval GROUP` evaluates
//! every run of the group and writes the summary again, with the evaluations in it;
//! `run --seeds 3,4 --into GROUP` adds runs that repeat the group's with other seeds, and
//! `locograph summary GROUP` writes the summary from what the runs hold now.
//!
//! ```text
//! runs/<name>-seeds-<timestamp>/
//!   seeds.json      the seeds, their run folders and the `--set` overrides
//!   seed-0/ …       one run directory per seed (`exec::run_dir`)
//!   summary.json    mean, std and the values of each measurement, over the finished runs
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::error::EvalError;
use crate::config::{Experiment, Loaded};
use crate::exec::run_dir;
use crate::exec::train::{TrainOptions, TrainSummary};
use crate::{Error, Result};

/// The group's index file.
pub const GROUP: &str = "seeds.json";
/// The group's summary.
pub const SUMMARY: &str = "summary.json";

/// `seeds.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Group {
    pub name: String,
    pub seeds: Vec<u64>,
    /// Run folders, relative to the group folder, in seed order.
    pub runs: Vec<String>,
    /// `--set` overrides common to every run (besides `seed`).
    pub overrides: Vec<String>,
}

/// Mean and sample standard deviation of one measurement over the runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Stat {
    pub mean: f64,
    /// `None` for a single value.
    pub std: Option<f64>,
    pub values: Vec<f64>,
}

impl Stat {
    /// The statistics of `values` (at least one).
    pub fn of(values: &[f64]) -> Stat {
        let n = values.len() as f64;
        let mean = values.iter().sum::<f64>() / n.max(1.0);
        let std = (values.len() > 1)
            .then(|| (values.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / (n - 1.0)).sqrt());
        Stat { mean, std, values: values.to_vec() }
    }
}

impl std::fmt::Display for Stat {
    /// `4.1234 ± 0.0123 (n = 3)`; accuracies in [0, 1] are shown as percentages by the caller.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.std {
            Some(s) => write!(f, "{:.4} ± {s:.4} (n = {})", self.mean, self.values.len()),
            None => write!(f, "{:.4} (n = 1)", self.mean),
        }
    }
}

/// `summary.json`: measurement name → statistics.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    /// Run folders the statistics are over (finished runs only).
    pub runs: Vec<String>,
    /// The last value of each `metrics.csv` column (losses, `knn_top1`), by column name.
    pub at_end: BTreeMap<String, Stat>,
    /// Test top-1 of each evaluation report, by `<protocol> <node>` (`knn res5`).
    pub eval: BTreeMap<String, Stat>,
}

/// Whether `dir` is a seed group.
pub fn is_group(dir: &Path) -> bool {
    dir.join(GROUP).is_file()
}

/// Reads `dir/seeds.json`.
pub fn read_group(dir: &Path) -> Result<Group> {
    let path = dir.join(GROUP);
    let text = crate::bounded::read_to_string(&path, crate::bounded::SMALL).map_err(|e| Error::io(&path, e))?;
    serde_json::from_str(&text).map_err(|e| EvalError::Metrics { path, why: e.to_string() }.into())
}

/// The run directories of a group that hold a finished run: their last saved step is the
/// run's length (an interrupted run has weights too, of an earlier step).
pub fn group_runs(dir: &Path) -> Result<Vec<PathBuf>> {
    let g = read_group(dir)?;
    Ok(g.runs.iter().map(|r| dir.join(r)).filter(|r| finished(r)).collect())
}

fn finished(run: &Path) -> bool {
    let json = |name: &str| -> Option<serde_json::Value> {
        let text = crate::bounded::read_to_string(&run.join(name), crate::bounded::SMALL).ok()?;
        serde_json::from_str(&text).ok()
    };
    let step = json(run_dir::META).and_then(|m| m["step"].as_u64());
    let total = json(run_dir::DERIVED).and_then(|d| d["total_steps"].as_u64());
    run.join(run_dir::WEIGHTS).is_file() && step.is_some() && step == total
}

/// The run folder of `seed` in a group.
fn run_name(seed: &u64) -> String {
    format!("seed-{seed}")
}

/// The group in `dir` with `seeds` added, if the new runs would be repeats of its runs: the
/// same experiment name, the same `--set` overrides, the same resolved experiment but for the
/// seed (an edited file is refused too), the same length, and seeds it does not hold yet.
/// Every problem is listed at once.
fn extended(dir: &Path, loaded: &Loaded, seeds: &[u64], overrides: &[String], steps: Option<u64>) -> Result<Group> {
    let mut g = read_group(dir)?;
    let exp = &loaded.experiment;
    let mut problems = vec![];
    if g.name != exp.name {
        problems.push(format!("the group holds runs of `{}`, this is `{}`", g.name, exp.name));
    }
    if g.overrides != overrides {
        problems.push(format!(
            "the group's runs were trained with --set {:?}, these would be with {:?}",
            g.overrides, overrides
        ));
    }
    let held: Vec<u64> =
        seeds.iter().copied().filter(|s| g.seeds.contains(s) || dir.join(run_name(s)).exists()).collect();
    if !held.is_empty() {
        let unfinished: Vec<String> = held
            .iter()
            .map(|s| dir.join(run_name(s)))
            .filter(|r| r.exists() && !finished(r))
            .map(|r| format!("`locograph resume {}`", r.display()))
            .collect();
        let hint =
            if unfinished.is_empty() { String::new() } else { format!("; to finish: {}", unfinished.join(", ")) };
        problems.push(format!("the group already holds seed(s) {held:?}{hint}"));
    }
    // The first finished run stands for the group.
    if let Some(run) = group_runs(dir)?.first() {
        problems.extend(differences(run, exp, steps)?);
    }
    if !problems.is_empty() {
        return Err(EvalError::Settings { what: "--into", problems }.into());
    }
    g.seeds.extend(seeds);
    g.runs.extend(seeds.iter().map(run_name));
    Ok(g)
}

/// How training `exp` (for `steps`, when given) would differ from the finished `run` besides
/// the seed: its resolved experiment with the run's seed in it, and its length.
fn differences(run: &Path, exp: &Experiment, steps: Option<u64>) -> Result<Vec<String>> {
    let mut problems = vec![];
    let path = run.join(run_dir::CONFIG);
    let theirs = crate::bounded::read_to_string(&path, crate::bounded::SMALL).map_err(|e| Error::io(&path, e))?;
    let theirs: Experiment =
        serde_yaml::from_str(&theirs).map_err(|e| EvalError::Metrics { path: path.clone(), why: e.to_string() })?;
    let ours = Experiment { seed: theirs.seed, ..exp.clone() };
    if run_dir::resolved_yaml(&ours)? != run_dir::resolved_yaml(&theirs)? {
        problems.push(format!(
            "the experiment differs from the one {} was trained with (besides the seed): compare with its {}",
            run.display(),
            run_dir::CONFIG
        ));
    }
    let derived = |key: &str| -> Option<u64> {
        let text = crate::bounded::read_to_string(&run.join(run_dir::DERIVED), crate::bounded::SMALL).ok()?;
        serde_json::from_str::<serde_json::Value>(&text).ok()?[key].as_u64()
    };
    let total = derived("total_steps");
    let ours = steps.or(exp.train.steps).or_else(|| Some(exp.train.epochs.unwrap_or(1) * derived("steps_per_epoch")?));
    if total.is_some() && ours != total {
        problems.push(format!(
            "the group's runs trained {} steps, these would train {}",
            total.unwrap_or_default(),
            ours.map_or("an unknown number of".into(), |n| n.to_string())
        ));
    }
    Ok(problems)
}

/// Trains one run per seed into a new group folder under the runs root, or, with `into`, adds
/// them to that existing group (`run --seeds 3,4 --into GROUP`: more seeds for a comparison
/// already made). `load(seed)` gives the experiment with that seed. Stops after a run that was
/// interrupted. `train_one` is the training of one run (`eval::monitor::train`: with the
/// `monitor:` section measured).
pub fn train_seeds(
    load: &dyn Fn(u64) -> Result<Loaded>,
    seeds: &[u64],
    into: Option<&Path>,
    opts: &TrainOptions,
    train_one: &dyn Fn(&Loaded, &TrainOptions) -> Result<TrainSummary>,
) -> Result<(PathBuf, Vec<TrainSummary>)> {
    let Some(&first) = seeds.first() else {
        return Err(EvalError::Settings { what: "--seeds", problems: vec!["give at least one seed".into()] }.into());
    };
    let mut unique = seeds.to_vec();
    unique.sort_unstable();
    unique.dedup();
    if unique.len() != seeds.len() {
        return Err(EvalError::Settings {
            what: "--seeds",
            problems: vec![format!("a seed is repeated in {seeds:?}")],
        }
        .into());
    }
    let loaded = load(first)?;
    let exp = &loaded.experiment;
    let overrides: Vec<String> = loaded.overrides.iter().filter(|o| o.path != "seed").map(|o| o.text.clone()).collect();
    let (dir, group) = match into {
        Some(dir) => (dir.to_path_buf(), extended(dir, &loaded, seeds, &overrides, opts.steps)?),
        None => {
            let root = run_dir::root(&loaded, opts.runs_dir.as_deref());
            let dir = run_dir::new_dir(&root, &format!("{}-seeds", exp.name));
            std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
            let runs = seeds.iter().map(run_name).collect();
            (dir, Group { name: exp.name.clone(), seeds: seeds.to_vec(), runs, overrides })
        }
    };
    let text = serde_json::to_string_pretty(&group).map_err(|e| EvalError::Serialise(e.to_string()))?;
    let index = dir.join(GROUP);
    std::fs::write(&index, text + "\n").map_err(|e| Error::io(&index, e))?;
    let mut out = vec![];
    for seed in seeds {
        let (loaded, run) = (load(*seed)?, dir.join(run_name(seed)));
        eprintln!("seed {seed}: {}", run.display());
        let o = TrainOptions { run_dir: Some(run), ..opts.clone() };
        let s = train_one(&loaded, &o)?;
        let stop = s.interrupted;
        out.push(s);
        if stop {
            break;
        }
    }
    Ok((dir, out))
}

/// The last value of each `metrics.csv` column but the bookkeeping ones (an empty cell, as
/// `knn_top1` has between monitor steps, does not count).
fn at_end(run: &Path) -> Result<Vec<(String, f64)>> {
    let (header, rows) = super::metrics_file::read_metrics(run)?;
    let skip = ["step", "epoch", "lr", "images_per_sec", "elapsed_s"];
    Ok(header
        .iter()
        .enumerate()
        .filter(|(_, h)| !skip.contains(&h.as_str()))
        .filter_map(|(i, h)| {
            rows.iter().rev().find_map(|r| r.get(i).copied().filter(|v| v.is_finite())).map(|v| (h.clone(), v))
        })
        .collect())
}

/// Test top-1 of every `eval_<protocol>_<node>.json` in `run`, by `<protocol> <node>`.
fn evals(run: &Path) -> Result<Vec<(String, f64)>> {
    let mut out = vec![];
    let entries = std::fs::read_dir(run).map_err(|e| Error::io(run, e))?;
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !(name.starts_with("eval_") && name.ends_with(".json")) {
            continue;
        }
        let path = e.path();
        let text = crate::bounded::read_to_string(&path, crate::bounded::SMALL).map_err(|err| Error::io(&path, err))?;
        let r: serde_json::Value = serde_json::from_str(&text)
            .map_err(|err| EvalError::Metrics { path: path.clone(), why: err.to_string() })?;
        let (Some(p), Some(n), Some(t)) =
            (r["protocol"].as_str(), r["node"].as_str(), r["result"]["test_top1"].as_f64())
        else {
            continue;
        };
        out.push((format!("{p} {n}"), t));
    }
    Ok(out)
}

/// Statistics over `runs` of their last metrics and their evaluations; a measurement counts
/// only when every run has it (so a mean is never over a subset without saying so).
pub fn summarize(runs: &[PathBuf]) -> Result<Summary> {
    let mut at: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    let mut ev: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    for r in runs {
        for (k, v) in at_end(r)? {
            at.entry(k).or_default().push(v);
        }
        for (k, v) in evals(r)? {
            ev.entry(k).or_default().push(v);
        }
    }
    let full = |m: BTreeMap<String, Vec<f64>>| {
        m.into_iter().filter(|(_, v)| v.len() == runs.len()).map(|(k, v)| (k, Stat::of(&v))).collect()
    };
    let names = runs.iter().map(|r| r.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default());
    Ok(Summary { runs: names.collect(), at_end: full(at), eval: full(ev) })
}

/// Summarises the finished runs of group `dir` into `dir/summary.json`; returns the summary.
pub fn write_summary(dir: &Path) -> Result<Summary> {
    let s = summarize(&group_runs(dir)?)?;
    let path = dir.join(SUMMARY);
    let text = serde_json::to_string_pretty(&s).map_err(|e| EvalError::Serialise(e.to_string()))?;
    std::fs::write(&path, text + "\n").map_err(|e| Error::io(&path, e))?;
    Ok(s)
}

/// The summary as terminal lines: `L3 at the end: 4.1234 ± 0.0123 (n = 3)`,
/// `knn res5: top-1 74.12 ± 0.53 % (n = 3)`.
pub fn lines(s: &Summary) -> Vec<String> {
    let mut out: Vec<String> = s
        .at_end
        .iter()
        .map(|(k, st)| {
            if k.ends_with("_top1") {
                format!("{k} at the end: {}", percent(st))
            } else {
                format!("{k} at the end: {st}")
            }
        })
        .collect();
    out.extend(s.eval.iter().map(|(k, st)| format!("{k}: top-1 {}", percent(st))));
    out
}

/// An accuracy in [0, 1] as `74.12 ± 0.53 % (n = 3)`.
pub fn percent(st: &Stat) -> String {
    match st.std {
        Some(sd) => format!("{:.2} ± {:.2} % (n = {})", 100.0 * st.mean, 100.0 * sd, st.values.len()),
        None => format!("{:.2} % (n = 1)", 100.0 * st.mean),
    }
}

#[cfg(test)]
mod tests {
    use super::Stat;

    #[test]
    fn sample_standard_deviation() {
        // numpy: np.std([1, 2, 4], ddof=1) = 1.5275252316519468
        let s = Stat::of(&[1.0, 2.0, 4.0]);
        assert!((s.mean - 7.0 / 3.0).abs() < 1e-12);
        assert!((s.std.unwrap() - 1.527_525_231_651_946_8).abs() < 1e-12);
        assert_eq!(Stat::of(&[0.5]).std, None);
    }
}
