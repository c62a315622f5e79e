//! The training loop of `locograph run` and `locograph resume`: data → one routed step →
//! optimizer, with a run directory, a progress bar, `metrics.csv` (one column per loss) and
//! checkpoints (`exec::checkpoint`).
//!
//! # Determinism
//! On the CPU a run is a function of its seed: initialisation is seeded per parameter, the
//! data order and augmentations per `(seed, epoch, image)`, and candle's CPU kernels use no
//! atomics (each output element is reduced by one thread in a fixed order). So a resumed run
//! is bit-identical to an uninterrupted one **with the same thread count** (`train.threads`,
//! or `RAYON_NUM_THREADS`, which candle's matmul reads) on the same machine kind: a
//! different count or CPU can change how gemm blocks its reductions.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use candle_core::Device;
use indicatif::{ProgressBar, ProgressStyle};
use tracing::{info, info_span};

use super::checkpoint::{self, CheckpointState};
use super::engine::{run_step_with, GradsFinal, Hooks};
use super::model::Model;
use super::run_dir;
use crate::config::{ConfigError, ConfigErrors, DeviceKind, Loaded, Precision};
use crate::data::{self, Dataset, PairLoader};
use crate::graph::{compile, explain, Compiled};
use crate::optim::{LrSchedule, Optimizer};
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
    /// Set (by a Ctrl-C handler) to stop after the current step with a checkpoint.
    pub stop: Option<Arc<AtomicBool>>,
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
    /// Stopped early through [`TrainOptions::stop`], after saving a checkpoint.
    pub interrupted: bool,
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
    if t.checkpoint_every == Some(0) {
        errors.push(at(
            "train.checkpoint_every",
            "must be at least 1 (leave it out for a checkpoint at the end only)".into(),
        ));
    }
    if t.log_every == 0 {
        errors.push(at("train.log_every", "must be at least 1".into()));
    }
    if e.device == DeviceKind::Cuda && !cfg!(feature = "cuda") {
        errors
            .push(at("device", "`device: cuda` needs a build with `--features cuda` (this binary is CPU-only)".into()));
    }
    if e.precision == Precision::Bf16 && e.device == DeviceKind::Cpu {
        errors.push(at(
            "precision",
            "`precision: bf16` needs `device: cuda` (candle 0.11.1's CPU matmul has no bf16; `f16` runs on CPU)".into(),
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

/// What training needs, built from an experiment before the first step.
struct Setup {
    compiled: Compiled,
    device: Device,
    ds: Arc<dyn Dataset>,
    model: Model,
    optimizer: Box<dyn Optimizer>,
    schedule: LrSchedule,
    total: u64,
    steps_per_epoch: u64,
    batch_size: usize,
    /// Size of rayon's pool, recorded in checkpoints (determinism needs the same count).
    threads: usize,
}

/// Checks everything (values, graph, memory estimate) and only then allocates the model.
/// `threads` is the count to use when the experiment names none (a resumed run's).
fn setup(loaded: &Loaded, total_override: Option<u64>, threads: Option<usize>) -> Result<Setup> {
    let compiled = validate(loaded)?;
    let exp = &loaded.experiment;
    if let Some(t) = exp.train.threads.or(threads) {
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
    if ds.len() < batch_size {
        // The loader drops the last incomplete batch, so an epoch would have no step at all.
        return Err(Error::Msg(format!(
            "{} has {} images, fewer than `train.batch_size` ({batch_size}): an epoch would have no full batch",
            ds.name(),
            ds.len()
        )));
    }
    let steps_per_epoch = (ds.len() / batch_size).max(1) as u64;
    let total = total_override.or(exp.train.steps).unwrap_or_else(|| exp.train.epochs.unwrap_or(1) * steps_per_epoch);
    let schedule = exp.schedule.build(batch_size, total as usize, steps_per_epoch as usize);
    let model = Model::new(&compiled, exp.seed, &device)?.with_compute(exp.precision.dtype());
    let optimizer = exp.optimizer.build();
    Ok(Setup {
        compiled,
        device,
        ds,
        model,
        optimizer,
        schedule,
        total,
        steps_per_epoch,
        batch_size,
        threads: rayon::current_num_threads(),
    })
}

/// Where the training loop starts: step 0 of a new run, or a checkpoint's position.
struct Start {
    step: u64,
    epoch: u64,
    batch_in_epoch: u64,
    elapsed_s: f64,
    first_losses: Vec<(String, f32)>,
}

/// Trains the experiment; returns where the run went and how it ended.
pub fn train(loaded: &Loaded, opts: &TrainOptions) -> Result<TrainSummary> {
    let s = setup(loaded, opts.steps, None)?;
    let exp = &loaded.experiment;
    let (compiled, ds, model) = (&s.compiled, &s.ds, &s.model);
    let (batch_size, steps_per_epoch, total) = (s.batch_size, s.steps_per_epoch, s.total);
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
    let (c, h, w) = exp.data.output_shape(ds.as_ref());
    let derived = serde_json::json!({
        "seed": exp.seed,
        "method": run_dir::method_name(compiled),
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
        "threads": s.threads,
    });
    write(&dir.join(run_dir::CONFIG), &run_dir::resolved_yaml(exp)?)?;
    write(&dir.join(run_dir::EXPLAIN), &explain::table(compiled))?;
    write(&dir.join(run_dir::DERIVED), &serde_json::to_string_pretty(&derived).unwrap_or_default())?;
    info!(run_dir = %dir.display(), "run directory");
    eprintln!("run directory: {}", dir.display());
    eprintln!(
        "derived: {} ({} images), batch {} images = {} views/step, {} steps/epoch, {} steps ({:.2} epochs), peak lr {:.4}, {} parameters ({} trainable), method {}, {} threads",
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
        run_dir::method_name(compiled),
        s.threads,
    );

    let metrics_path = dir.join(run_dir::METRICS);
    let mut metrics = std::fs::File::create(&metrics_path).map_err(|e| Error::io(&metrics_path, e))?;
    metrics.write_all(metrics_header(compiled).as_bytes()).map_err(|e| Error::io(&metrics_path, e))?;
    let start = Start { step: 0, epoch: 0, batch_in_epoch: 0, elapsed_s: 0.0, first_losses: vec![] };
    run_loop(loaded, s, &dir, opts, start, metrics)
}

fn metrics_header(c: &Compiled) -> String {
    let ids: Vec<&str> = c.losses.iter().map(|&l| c.id(l)).collect();
    format!("step,epoch,lr,{},images_per_sec,elapsed_s\n", ids.join(","))
}

/// Keeps `metrics.csv`'s header and its rows up to `step`: the rows past the checkpoint are
/// logged again by the resumed run. A torn last row (a crash mid-write) is dropped too.
fn truncate_metrics(path: &Path, header: &str, step: u64) -> Result<()> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let fields = header.trim_end().split(',').count();
    let mut out = String::from(header);
    for line in text.lines().skip(1) {
        let keep = line.split(',').count() == fields
            && line.split(',').next().and_then(|s| s.parse::<u64>().ok()).is_some_and(|s| s <= step);
        if keep {
            out.push_str(line);
            out.push('\n');
        }
    }
    checkpoint::write_atomic(path, out.as_bytes())
}

/// Continues the run in `run` from its newest checkpoint, in place: same run directory,
/// `metrics.csv` cut back to the checkpoint's step and appended to. With the same thread
/// count the result is bit-identical to a run that was never interrupted.
///
/// `opts.steps` replaces the run's length (which changes a decaying schedule's learning
/// rates, so the result then differs from the original run's); the other options are unused.
pub fn resume(run: &Path, opts: &TrainOptions) -> Result<TrainSummary> {
    let ckpt = checkpoint::latest(run)?;
    let st = &ckpt.state;
    let loaded = run_dir::load_config(run)?;
    let exp = &loaded.experiment;
    let total = opts.steps.unwrap_or(st.total_steps);
    if st.step >= total {
        eprintln!("{}: already complete at step {} of {total}", run.display(), st.step);
        return Ok(TrainSummary {
            run_dir: run.to_path_buf(),
            steps: st.step,
            final_losses: vec![],
            first_losses: st.first_losses.clone(),
            images_per_sec: 0.0,
            seconds: 0.0,
            interrupted: false,
        });
    }
    // The memory check in `setup` runs before the model exists; the graph check needs the
    // model, so that the mismatching keys can be listed together with the hash.
    let mut s = setup(&loaded, Some(total), Some(st.threads))?;
    let hash = checkpoint::graph_hash(exp);
    let graph_changed = (hash != st.graph_hash).then(|| {
        format!(
            "checkpoint {} was written for graph {}, but {} describes graph {hash}: nodes or edges changed since",
            ckpt.dir.display(),
            st.graph_hash,
            run.join(run_dir::CONFIG).display()
        )
    });
    match (ckpt.apply(&s.model, s.optimizer.as_mut()), graph_changed) {
        (Err(e), Some(g)) => return Err(Error::Msg(format!("{g}\n{e}"))),
        (Err(e), None) => return Err(e),
        (Ok(()), Some(g)) => {
            return Err(Error::Msg(format!(
                "{g} (the parameter names and shapes still fit, but the routing would differ: not the same run)"
            )))
        }
        (Ok(()), None) => {}
    }
    if st.seed != exp.seed {
        return Err(Error::Msg(format!(
            "{}: `seed` is {} but the checkpoint was trained with seed {}: the data order would differ",
            run.join(run_dir::CONFIG).display(),
            exp.seed,
            st.seed
        )));
    }
    let saved = std::fs::read_to_string(ckpt.dir.join(checkpoint::CONFIG)).unwrap_or_default();
    if saved != run_dir::resolved_yaml(exp)? {
        eprintln!(
            "warning: {} differs from the checkpoint's copy outside the graph; continuing with it (the run will not match an uninterrupted one)",
            run.join(run_dir::CONFIG).display()
        );
    }
    if s.threads != st.threads {
        eprintln!(
            "warning: {} threads now, {} when the checkpoint was written: results will not be bit-identical to an uninterrupted run",
            s.threads, st.threads
        );
    }
    let metrics_path = run.join(run_dir::METRICS);
    let header = metrics_header(&s.compiled);
    truncate_metrics(&metrics_path, &header, st.step)?;
    let metrics =
        std::fs::OpenOptions::new().append(true).open(&metrics_path).map_err(|e| Error::io(&metrics_path, e))?;
    eprintln!(
        "resuming {} from step {} of {} (epoch {}, batch {}), checkpoint {}",
        run.display(),
        st.step,
        total,
        st.epoch,
        st.batch_in_epoch,
        ckpt.dir.display()
    );
    s.total = total;
    let start = Start {
        step: st.step,
        epoch: st.epoch,
        batch_in_epoch: st.batch_in_epoch,
        elapsed_s: st.elapsed_s,
        first_losses: st.first_losses.clone(),
    };
    run_loop(&loaded, s, run, opts, start, metrics)
}

/// Applies `optimizer` to one node's parameters as soon as their gradients are final
/// ([`Hooks::grads_final`]) and frees the gradients: a unit of a GIM or LoCo step is updated as
/// soon as its losses' backwards are done, so the step never holds the gradients of units that
/// are finished (the same update as one optimizer step after the whole step: updates are per
/// parameter, and no later backward reads the node's weights).
///
/// Does nothing once a loss of the step is not finite: the caller stops before the next step
/// (nodes updated before that loss was computed only had finite losses' gradients).
pub fn update_when_final(
    optimizer: &mut dyn crate::optim::Optimizer,
    model: &Model,
    f: GradsFinal<'_>,
    lr: f64,
) -> candle_core::Result<()> {
    if f.losses.iter().any(|(_, v)| !v.is_finite()) {
        return Ok(());
    }
    let params: Vec<_> = f.params.iter().map(|&i| model.params.params[i].clone()).collect();
    let grads: Vec<_> = f.params.iter().map(|&i| f.grads[i].take()).collect();
    optimizer.step(&params, &grads, lr)
}

/// Saves a checkpoint (weights, optimizer state, data position) and the run directory's
/// latest `weights.safetensors`/`meta.json`, in that order: the checkpoint is what resume
/// reads, so it must be durable first.
fn save_all(loaded: &Loaded, s: &Setup, dir: &Path, state: CheckpointState) -> Result<()> {
    let step = state.step;
    checkpoint::save(dir, &run_dir::resolved_yaml(&loaded.experiment)?, &s.model, s.optimizer.as_ref(), state)?;
    run_dir::save(dir, loaded, &s.compiled, &s.model, step)
}

/// The steps from `start` to `s.total`, logging, checkpointing and stopping on request.
fn run_loop(
    loaded: &Loaded,
    mut s: Setup,
    dir: &Path,
    opts: &TrainOptions,
    start: Start,
    mut metrics: std::fs::File,
) -> Result<TrainSummary> {
    let exp = &loaded.experiment;
    let metrics_path = dir.join(run_dir::METRICS);
    let (total, batch_size, steps_per_epoch) = (s.total, s.batch_size, s.steps_per_epoch);
    let graph_hash = checkpoint::graph_hash(exp);
    let bar = if opts.quiet { ProgressBar::hidden() } else { ProgressBar::new(total) };
    bar.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} steps  {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_position(start.step);
    let clock = Instant::now();
    let elapsed = |clock: &Instant| start.elapsed_s + clock.elapsed().as_secs_f64();
    let mut step = start.step;
    let mut epoch = start.epoch;
    let mut skip = start.batch_in_epoch;
    let mut first = start.first_losses.clone();
    let mut last: Vec<(String, f32)> = vec![];
    let mut window = (Instant::now(), 0usize);
    let mut ips = 0.0;
    let mut interrupted = false;
    let state_at =
        |step: u64, epoch: u64, batch_in_epoch: u64, elapsed_s: f64, first: &[(String, f32)]| CheckpointState {
            format_version: checkpoint::FORMAT_VERSION,
            step,
            epoch,
            batch_in_epoch,
            total_steps: total,
            seed: exp.seed,
            graph_hash: graph_hash.clone(),
            threads: s.threads,
            elapsed_s,
            first_losses: first.to_vec(),
            files: Default::default(),
            locograph: env!("CARGO_PKG_VERSION").to_string(),
        };
    'outer: while step < total {
        let loader = PairLoader::new(s.ds.clone(), &exp.data, batch_size, exp.seed, epoch as usize);
        // Batches of this epoch already trained on before the checkpoint: the loader is a pure
        // function of (seed, epoch), so skipping them puts the data exactly where it was.
        let mut batch_in_epoch = skip;
        for batch in loader.skip(skip as usize) {
            if step >= total {
                break 'outer;
            }
            let batch = batch?;
            let _span = info_span!("step", step).entered();
            let x = batch.to_tensor(&s.device)?;
            let lr = s.schedule.lr(step as usize);
            // Each node is updated as soon as its gradients are final (see `update_when_final`).
            let mut update = |f: GradsFinal<'_>| update_when_final(s.optimizer.as_mut(), &s.model, f, lr);
            let hooks = Hooks { grads_final: Some(&mut update), ..Hooks::default() };
            let out = run_step_with(&s.compiled, &s.model, &x, hooks)?;
            last = out.losses.iter().map(|&(n, v)| (s.compiled.id(n).to_string(), v)).collect();
            if let Some((id, v)) = last.iter().find(|(_, v)| !v.is_finite()) {
                bar.abandon();
                // Return before any save: the last checkpoint stays the last good one. (No
                // gradient of a non-finite loss was applied: `update_when_final`.)
                return Err(Error::Msg(format!(
                    "loss `{id}` is {v} at step {step}; stopping (the last checkpoint in {} is kept). Lower the learning rate?",
                    dir.display()
                )));
            }
            if step == 0 {
                first = last.clone();
            }
            step += 1;
            batch_in_epoch += 1;
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
                    elapsed(&clock)
                );
                metrics.write_all(row.as_bytes()).map_err(|e| Error::io(&metrics_path, e))?;
                let msg: Vec<String> = last.iter().map(|(id, v)| format!("{id} {v:.4}")).collect();
                info!(step, lr, images_per_sec = ips, losses = %msg.join(" "), "train");
                bar.set_message(format!("{}  {ips:.1} img/s", msg.join("  ")));
            }
            bar.inc(1);
            let stop = opts.stop.as_ref().is_some_and(|f| f.load(Ordering::SeqCst));
            let due = exp.train.checkpoint_every.is_some_and(|k| step.is_multiple_of(k));
            if step < total && (due || stop) {
                // metrics.csv rows must be on disk before a checkpoint claims their step.
                metrics.sync_data().map_err(|e| Error::io(&metrics_path, e))?;
                save_all(loaded, &s, dir, state_at(step, epoch, batch_in_epoch, elapsed(&clock), &first))?;
            }
            if stop && step < total {
                interrupted = true;
                break 'outer;
            }
        }
        epoch += 1;
        skip = 0;
    }
    if interrupted {
        bar.abandon();
        eprintln!(
            "interrupted: checkpoint at step {step} of {total} in {}; continue with `locograph resume {}`",
            dir.display(),
            dir.display()
        );
    } else {
        bar.finish();
        metrics.sync_data().map_err(|e| Error::io(&metrics_path, e))?;
        // Every epoch has exactly `steps_per_epoch` batches, so the data position after
        // `step` steps is a function of it; `resume --steps` can continue from there.
        let per = steps_per_epoch.max(1);
        save_all(loaded, &s, dir, state_at(step, step / per, step % per, elapsed(&clock), &first))?;
    }
    let seconds = elapsed(&clock);
    if !interrupted {
        eprintln!("done: {step} steps in {seconds:.1} s; weights in {}", dir.join(run_dir::WEIGHTS).display());
    }
    Ok(TrainSummary {
        run_dir: dir.to_path_buf(),
        steps: step,
        final_losses: last,
        first_losses: first,
        images_per_sec: ips,
        seconds,
        interrupted,
    })
}

/// Compiles without training: what `locograph validate` runs. Also refuses a configuration
/// whose training step would not fit in memory ([`check_memory`]).
pub fn validate(loaded: &Loaded) -> Result<Compiled> {
    let compiled = compile(loaded);
    let values = check_values(loaded);
    match (compiled, values) {
        (Ok(c), Ok(())) => {
            check_memory(loaded, &c)?;
            Ok(c)
        }
        (Err(g), _) => Err(g.into()),
        (Ok(_), Err(v)) => Err(v.into()),
    }
}

/// A rough estimate of the memory one training step needs, in bytes (f64: absurd configs
/// must not overflow). An order of magnitude, not a measurement: it is only meant to refuse
/// configurations that could never run before they allocate anything.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MemoryEstimate {
    /// Activations held at the peak of one step of `2 × batch_size` views, with a margin for
    /// the backward's working set, and the losses' similarity matrices.
    pub activations: f64,
    /// Parameters × 4 bytes × 4: weights, gradients and two optimizer slots (AdamW's moments).
    pub parameters: f64,
}

impl MemoryEstimate {
    pub fn total(&self) -> f64 {
        self.activations + self.parameters
    }
}

/// What a step's measured peak adds to the schedule's predicted activations: the gradients in
/// flight inside a block's backward, 4–22 % at ImageNet scale (docs/performance.md).
const WORKING_SET: f64 = 1.25;

/// Estimates [`MemoryEstimate`] from the compiled shapes, without allocating anything:
/// activations = the schedule's predicted peak (`eval::schedule_memory`, which follows the
/// method's edges: GIM and LoCo free each unit before the next) × [`WORKING_SET`], plus each
/// loss's `2N × 2N` similarities ×4; parameters ≈ an upper bound per node from its widths
/// (3×3 convolutions at the widest width of a block, the MLP's matrices).
pub fn estimate_memory(loaded: &Loaded, c: &Compiled) -> MemoryEstimate {
    use crate::config::NodeConfig;
    let n_views = 2 * loaded.experiment.train.batch_size;
    let views = n_views as f64;
    let held = crate::eval::schedule_memory::held_bytes(c, n_views, 4);
    let mut activations = held.peak().map_or(0.0, |p| p.1 as f64) * WORKING_SET;
    let mut params = 0.0;
    for n in c.graph.node_indices() {
        let node = &c.graph[n];
        let input: Vec<f64> =
            c.producer(n).map(|(_, p)| c.graph[p].shape.iter().map(|&d| d as f64).collect()).unwrap_or_default();
        let c_in = input.first().copied().unwrap_or(0.0);
        let sq = |x: f64| x * x;
        match &node.config {
            None => {}
            Some(NodeConfig::Stem(s)) => params += 49.0 * c_in * s.channels as f64,
            Some(NodeConfig::Stage(s)) => {
                let blocks = s.blocks.max(1) as f64;
                let widest = c_in.max(s.channels as f64).max(s.width.unwrap_or(0) as f64);
                params += blocks * 2.0 * 9.0 * sq(widest) + c_in * s.channels as f64;
            }
            Some(NodeConfig::Decoder(d)) => {
                let mut width = c_in;
                if let Some(cb) = &d.conv_block {
                    let ch = cb.channels.map_or(c_in, |x| x as f64);
                    params += cb.blocks.max(1) as f64 * 2.0 * 9.0 * sq(c_in.max(ch));
                    width = ch;
                }
                let hidden = d.mlp.hidden.map_or(width, |h| h as f64);
                let depth = d.mlp.depth.max(1) as f64;
                params += width * hidden + (depth - 1.0).max(0.0) * sq(hidden) + hidden * d.mlp.out as f64;
            }
            Some(NodeConfig::NtXent(_)) => activations += sq(views) * 4.0 * 4.0,
        }
    }
    MemoryEstimate { activations, parameters: params * 4.0 * 4.0 }
}

/// The memory limit training must fit in, and where it comes from: `LOCOGRAPH_MEMORY_LIMIT`
/// (bytes, or with a K/M/G/T suffix, powers of 1024), else `MemTotal` in `/proc/meminfo`.
/// `None` where neither exists (the check is then skipped).
pub fn memory_limit() -> Option<(f64, String)> {
    if let Ok(v) = std::env::var("LOCOGRAPH_MEMORY_LIMIT") {
        let v = v.trim();
        let (num, mult) = match v.chars().last().map(|c| c.to_ascii_uppercase()) {
            Some('K') => (&v[..v.len() - 1], 1024f64),
            Some('M') => (&v[..v.len() - 1], 1024f64.powi(2)),
            Some('G') => (&v[..v.len() - 1], 1024f64.powi(3)),
            Some('T') => (&v[..v.len() - 1], 1024f64.powi(4)),
            _ => (v, 1.0),
        };
        if let Ok(n) = num.trim().parse::<f64>() {
            return Some((n * mult, "LOCOGRAPH_MEMORY_LIMIT".into()));
        }
    }
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some((kib * 1024.0, "MemTotal in /proc/meminfo".into()))
}

fn human(bytes: f64) -> String {
    const UNITS: [&str; 7] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    let mut v = bytes;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u + 1 == UNITS.len() && v >= 1024.0 {
        format!("{bytes:.3e} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// Refuses a configuration whose estimated step ([`estimate_memory`]) exceeds
/// [`memory_limit`], with the estimate and the limit in the message.
pub fn check_memory(loaded: &Loaded, c: &Compiled) -> std::result::Result<(), ConfigErrors> {
    let Some((limit, source)) = memory_limit() else {
        return Ok(());
    };
    let est = estimate_memory(loaded, c);
    if est.total() <= limit {
        return Ok(());
    }
    Err(ConfigErrors(vec![ConfigError {
        location: loaded.locations.path("train.batch_size"),
        path: "train.batch_size".into(),
        message: format!(
            "a training step would need about {} (activations ≈ {} for {} views, parameters with gradients and optimizer state ≈ {}), more than the limit of {} ({source}); lower `train.batch_size`, `input.size` or the widths, or raise LOCOGRAPH_MEMORY_LIMIT",
            human(est.total()),
            human(est.activations),
            2u128 * loaded.experiment.train.batch_size as u128,
            human(est.parameters),
            human(limit),
        ),
    }]))
}
