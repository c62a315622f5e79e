//! The training loop of `locograph run`: data → one routed step → optimizer, with a run
//! directory, a progress bar, `metrics.csv` (one column per loss) and checkpoints.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use candle_core::Device;
use indicatif::{ProgressBar, ProgressStyle};
use tracing::{info, info_span};

use super::engine::run_step;
use super::model::Model;
use super::run_dir;
use crate::config::{ConfigError, ConfigErrors, DeviceKind, Loaded};
use crate::data::{self, Dataset, PairLoader};
use crate::graph::{compile, explain, Compiled};
use crate::{Error, Result};

/// Command-line overrides of the experiment.
#[derive(Clone, Debug, Default)]
pub struct TrainOptions {
    /// Replace `train.steps` / `train.epochs`.
    pub steps: Option<u64>,
    /// Replace `train.runs_dir`.
    pub runs_dir: Option<PathBuf>,
    /// Use exactly this run directory.
    pub run_dir: Option<PathBuf>,
    /// Hide the progress bar.
    pub quiet: bool,
}

/// What a finished run reports.
#[derive(Clone, Debug)]
pub struct TrainSummary {
    pub run_dir: PathBuf,
    pub steps: u64,
    /// The last logged value of each loss.
    pub final_losses: Vec<(String, f32)>,
    /// Each loss at the first step.
    pub first_losses: Vec<(String, f32)>,
    pub images_per_sec: f64,
    pub seconds: f64,
}

/// Picks the device named in the experiment; CUDA needs a `--features cuda` build.
pub fn device(kind: DeviceKind) -> Result<Device> {
    match kind {
        DeviceKind::Cpu => Ok(Device::Cpu),
        #[cfg(feature = "cuda")]
        DeviceKind::Cuda => Ok(Device::new_cuda(0)?),
        #[cfg(not(feature = "cuda"))]
        DeviceKind::Cuda => {
            Err(Error::Msg("`device: cuda` needs a build with `--features cuda` (this binary is CPU-only)".into()))
        }
    }
}

/// Checks the values of every section (types were checked by the loader); all problems at once.
pub fn check_values(loaded: &Loaded) -> std::result::Result<(), ConfigErrors> {
    let e = &loaded.experiment;
    let at = |path: &str, message: String| ConfigError {
        location: loaded.locations.path(path),
        path: path.to_string(),
        message,
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
    if t.log_every == 0 {
        errors.push(at("train.log_every", "must be at least 1".into()));
    }
    if e.device == DeviceKind::Cuda && !cfg!(feature = "cuda") {
        errors
            .push(at("device", "`device: cuda` needs a build with `--features cuda` (this binary is CPU-only)".into()));
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

/// `YYYYmmdd-HHMMSS` in UTC, without a date-time dependency.
fn timestamp() -> String {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil-from-days (H. Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}{m:02}{d:02}-{:02}{:02}{:02}", rem / 3600, rem % 3600 / 60, rem % 60)
}

fn write(path: &Path, text: &str) -> Result<()> {
    std::fs::write(path, text).map_err(|e| Error::io(path, e))
}

/// Trains the experiment; returns where the run went and how it ended.
pub fn train(loaded: &Loaded, opts: &TrainOptions) -> Result<TrainSummary> {
    check_values(loaded)?;
    let compiled = compile(loaded)?;
    let exp = &loaded.experiment;
    if let Some(t) = exp.train.threads {
        // candle's CPU kernels and the gemm crate read rayon's global pool.
        let _ = rayon::ThreadPoolBuilder::new().num_threads(t).build_global();
    }
    let device = device(exp.device)?;
    let ds: Arc<dyn Dataset> = data::open(&exp.data, &loaded.base_dir, None)?;
    let (c, h, w) = exp.data.output_shape(ds.as_ref());
    if (c, h, w) != (exp.input.channels, exp.input.size, exp.input.size) {
        return Err(ConfigErrors(vec![ConfigError {
            location: loaded.locations.path("input"),
            path: "input".into(),
            message: format!(
                "the data pipeline gives {c}×{h}×{w} images but `input` says {}×{}×{}: set `data.augment.size`/`to_rgb` or `input`",
                exp.input.channels, exp.input.size, exp.input.size
            ),
        }])
        .into());
    }
    let batch_size = exp.train.batch_size;
    let steps_per_epoch = (ds.len() / batch_size).max(1) as u64;
    let total = opts.steps.or(exp.train.steps).unwrap_or_else(|| exp.train.epochs.unwrap_or(1) * steps_per_epoch);
    let schedule = exp.schedule.build(batch_size, total as usize, steps_per_epoch as usize);
    let model = Model::new(&compiled, exp.seed, &device)?;
    let mut optimizer = exp.optimizer.build();

    let dir = match &opts.run_dir {
        Some(d) => d.clone(),
        None => {
            let root = opts.runs_dir.clone().unwrap_or_else(|| exp.train.runs_dir.clone());
            root.join(format!("{}-{}", exp.name, timestamp()))
        }
    };
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    let loss_ids: Vec<String> = compiled.losses.iter().map(|&l| compiled.id(l).to_string()).collect();
    let trainable: usize = model.params.trainable().map(|p| p.var.elem_count()).sum();
    let derived = serde_json::json!({
        "seed": exp.seed,
        "method": run_dir::method_name(&compiled),
        "dataset": ds.name(),
        "images": ds.len(),
        "batch_size": batch_size,
        "views_per_step": 2 * batch_size,
        "steps_per_epoch": steps_per_epoch,
        "total_steps": total,
        "epochs": total as f64 / steps_per_epoch as f64,
        "peak_lr": exp.schedule.peak_lr(batch_size),
        "lr_scaling": "lr × batch/256 when schedule.scale_with_batch",
        "parameters": model.params.num_parameters(),
        "trainable_parameters": trainable,
        "losses": loss_ids,
        "input": [c, h, w],
    });
    write(&dir.join(run_dir::CONFIG), &run_dir::resolved_yaml(exp)?)?;
    write(&dir.join(run_dir::EXPLAIN), &explain::table(&compiled))?;
    write(&dir.join(run_dir::DERIVED), &serde_json::to_string_pretty(&derived).unwrap_or_default())?;
    info!(run_dir = %dir.display(), "run directory");
    eprintln!("run directory: {}", dir.display());
    eprintln!(
        "derived: {} ({} images), batch {} images = {} views/step, {} steps/epoch, {} steps ({:.2} epochs), peak lr {:.4}, {} parameters ({} trainable), method {}",
        ds.name(),
        ds.len(),
        batch_size,
        2 * batch_size,
        steps_per_epoch,
        total,
        total as f64 / steps_per_epoch as f64,
        exp.schedule.peak_lr(batch_size),
        model.params.num_parameters(),
        trainable,
        run_dir::method_name(&compiled),
    );

    let metrics_path = dir.join(run_dir::METRICS);
    let mut metrics = std::fs::File::create(&metrics_path).map_err(|e| Error::io(&metrics_path, e))?;
    let header = format!("step,epoch,lr,{},images_per_sec,elapsed_s\n", loss_ids.join(","));
    metrics.write_all(header.as_bytes()).map_err(|e| Error::io(&metrics_path, e))?;

    let bar = if opts.quiet { ProgressBar::hidden() } else { ProgressBar::new(total) };
    bar.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} steps  {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let start = Instant::now();
    let mut step: u64 = 0;
    let mut epoch = 0usize;
    let mut first: Vec<(String, f32)> = vec![];
    let mut last: Vec<(String, f32)> = vec![];
    let mut window = (Instant::now(), 0usize);
    let mut ips = 0.0;
    'outer: while step < total {
        let loader = PairLoader::new(ds.clone(), &exp.data, batch_size, exp.seed, epoch);
        for batch in loader {
            if step >= total {
                break 'outer;
            }
            let batch = batch?;
            let _span = info_span!("step", step).entered();
            let x = batch.to_tensor(&device)?;
            let out = run_step(&compiled, &model, &x)?;
            let lr = schedule.lr(step as usize);
            last = out.losses.iter().map(|&(n, v)| (compiled.id(n).to_string(), v)).collect();
            if let Some((id, v)) = last.iter().find(|(_, v)| !v.is_finite()) {
                bar.abandon();
                return Err(Error::Msg(format!(
                    "loss `{id}` is {v} at step {step}; stopping (the last checkpoint in {} is kept). Lower the learning rate?",
                    dir.display()
                )));
            }
            optimizer.step(&model.params.params, &out.grads, lr)?;
            if step == 0 {
                first = last.clone();
            }
            step += 1;
            window.1 += batch_size;
            if step.is_multiple_of(exp.train.log_every) || step == total {
                let dt = window.0.elapsed().as_secs_f64();
                ips = window.1 as f64 / dt.max(1e-9);
                window = (Instant::now(), 0);
                let vals: Vec<String> = last.iter().map(|(_, v)| format!("{v:.5}")).collect();
                let row = format!(
                    "{step},{:.4},{lr:.6},{},{ips:.2},{:.2}\n",
                    step as f64 / steps_per_epoch as f64,
                    vals.join(","),
                    start.elapsed().as_secs_f64()
                );
                metrics.write_all(row.as_bytes()).map_err(|e| Error::io(&metrics_path, e))?;
                let msg: Vec<String> = last.iter().map(|(id, v)| format!("{id} {v:.4}")).collect();
                info!(step, lr, images_per_sec = ips, losses = %msg.join(" "), "train");
                bar.set_message(format!("{}  {ips:.1} img/s", msg.join("  ")));
            }
            bar.inc(1);
            if exp.train.checkpoint_every.is_some_and(|k| step.is_multiple_of(k) && step < total) {
                run_dir::save(&dir, loaded, &compiled, &model, step)?;
            }
        }
        epoch += 1;
    }
    bar.finish();
    run_dir::save(&dir, loaded, &compiled, &model, step)?;
    let seconds = start.elapsed().as_secs_f64();
    eprintln!("done: {step} steps in {seconds:.1} s; weights in {}", dir.join(run_dir::WEIGHTS).display());
    Ok(TrainSummary {
        run_dir: dir,
        steps: step,
        final_losses: last,
        first_losses: first,
        images_per_sec: ips,
        seconds,
    })
}

/// Compiles without training: what `locograph validate` runs.
pub fn validate(loaded: &Loaded) -> Result<Compiled> {
    let compiled = compile(loaded);
    let values = check_values(loaded);
    match (compiled, values) {
        (Ok(c), Ok(())) => Ok(c),
        (Err(g), _) => Err(g.into()),
        (Ok(_), Err(v)) => Err(v.into()),
    }
}
