//! The training loop of `locograph run` and `locograph resume`: data → one routed step →
//! optimizer, with a run directory, a progress bar, `metrics.csv` (`exec::metrics`) and
//! checkpoints (`exec::checkpoint`).
//!
//! # Determinism
//! On the CPU a run is a function of its seed: initialisation is seeded per parameter, the
//! data order and augmentations per `(seed, epoch, image)`, and candle's CPU kernels use no
//! atomics (each output element is reduced by one thread in a fixed order). So a resumed run
//! is bit-identical to an uninterrupted one **with the same thread count** (`train.threads`,
//! or `RAYON_NUM_THREADS`, which candle's matmul reads) on the same machine kind: a
//! different count or CPU can change how gemm blocks its reductions.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use indicatif::ProgressBar;
use tracing::{info, info_span};

use super::checkpoint::{self, CheckpointState};
use super::engine::{run_step_with, Hooks};
use super::error::{CheckpointError, TrainError};
use super::metrics::{Metrics, Row};
use super::model::Model;
use super::monitor::{Monitor, MonitorCost};
use super::run_dir;
use super::setup::Setup;
use super::step::{GradsFinal, StepInput};
use crate::config::Loaded;
use crate::data::PairLoader;
use crate::dist::meter::{Metered, Traffic};
use crate::dist::reducer::{GradReducer, Reduced, ReducerStats};
use crate::dist::{replicas, Communicator};
use crate::graph::explain;
use crate::optim::Optimizer;
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
    /// The ranks that train together, each on its share of every batch (`dist::world()`);
    /// `None`: this process alone.
    pub group: Option<Arc<dyn Communicator>>,
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
    /// What the ranks exchanged (several ranks only).
    pub communication: Option<Communication>,
    /// The monitor's last value and what measuring cost, when `monitor:` is on.
    pub monitor: Option<(f64, MonitorCost)>,
}

/// This rank's communication over a run: the gradient reducer's buckets and the collectives of
/// the step itself (batch norm statistics, the losses' gathers), for the summary and benchmarks.
#[derive(Clone, Copy, Debug)]
pub struct Communication {
    pub ranks: usize,
    /// Steps trained in this process.
    pub steps: u64,
    pub gradients: ReducerStats,
    pub step_collectives: Traffic,
}

fn write(path: &Path, text: &str) -> Result<()> {
    std::fs::write(path, text).map_err(|e| Error::io(path, e))
}

/// Where the training loop starts: step 0 of a new run, or a checkpoint's position.
struct Start {
    step: u64,
    epoch: u64,
    batch_in_epoch: u64,
    elapsed_s: f64,
    first_losses: Vec<(String, f32)>,
}

/// Trains the experiment into a new run directory; returns where the run went and how it ended.
/// An experiment with `monitor:` needs [`train_with`] and its monitor.
pub fn train(loaded: &Loaded, opts: &TrainOptions) -> Result<TrainSummary> {
    train_with(loaded, opts, None)
}

/// Refuses a `monitor:` section without a monitor, so that it is never silently skipped.
fn check_monitor(loaded: &Loaded, monitor: &Option<&mut dyn Monitor>) -> Result<()> {
    if loaded.experiment.monitor.is_some() && monitor.is_none() {
        return Err(TrainError::NoMonitor.into());
    }
    Ok(())
}

/// [`train`], measuring `monitor` every `monitor.every()` steps into its `metrics.csv` column.
pub fn train_with(loaded: &Loaded, opts: &TrainOptions, monitor: Option<&mut dyn Monitor>) -> Result<TrainSummary> {
    // Not silently one process: an experiment with a `placement:` runs its units on separate
    // ranks (exec::stage_train).
    if loaded.experiment.placement.is_some() {
        return Err(TrainError::StageParallel.into());
    }
    check_monitor(loaded, &monitor)?;
    let (group, meter) = metered(opts);
    let s = Setup::new_in(loaded, opts.steps, None, group.clone())?;
    let exp = &loaded.experiment;
    let mut dir = match &opts.run_dir {
        Some(d) => d.clone(),
        None => run_dir::new_dir(&run_dir::root(loaded, opts.runs_dir.as_deref()), &exp.name),
    };
    // Rank 0 names the run directory (its clock) and alone writes into it.
    let mut name = dir.to_string_lossy().into_owned().into_bytes();
    group.broadcast_bytes(&mut name, 0)?;
    dir = PathBuf::from(String::from_utf8_lossy(&name).into_owned());
    if group.rank() != 0 {
        let start = Start { step: 0, epoch: 0, batch_in_epoch: 0, elapsed_s: 0.0, first_losses: vec![] };
        return Trainer::new(loaded, s, &dir, opts, Watchers { metrics: None, meter, monitor: None }, &start)?
            .run(start);
    }
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    write(&dir.join(run_dir::CONFIG), &run_dir::resolved_yaml(exp)?)?;
    write(&dir.join(run_dir::EXPLAIN), &explain::table(&s.plan))?;
    let derived = derived(loaded, &s);
    write(&dir.join(run_dir::DERIVED), &serde_json::to_string_pretty(&derived).unwrap_or_default())?;
    info!(run_dir = %dir.display(), "run directory");
    eprintln!("run directory: {}", dir.display());
    eprintln!(
        "derived: {} ({} images), batch {} images = {} views/step{}, {} steps/epoch, {} steps ({:.2} epochs), peak lr {:.4}, {} parameters ({} trainable), method {}, {} threads",
        derived["dataset"].as_str().unwrap_or_default(),
        s.ds.len(),
        s.batch_size,
        2 * s.batch_size,
        ranks_note(&s),
        s.steps_per_epoch,
        s.total,
        s.total as f64 / s.steps_per_epoch as f64,
        exp.schedule.peak_lr(s.batch_size),
        s.model.params.num_parameters(),
        derived["trainable_parameters"],
        run_dir::method_name(&s.plan),
        s.threads,
    );
    let metrics = Metrics::create(&dir.join(run_dir::METRICS), &s.plan, monitor.as_ref().map(|m| m.column()))?;
    let start = Start { step: 0, epoch: 0, batch_in_epoch: 0, elapsed_s: 0.0, first_losses: vec![] };
    Trainer::new(loaded, s, &dir, opts, Watchers { metrics: Some(metrics), meter, monitor }, &start)?.run(start)
}

/// The group training runs in, metered when it has several ranks.
fn metered(opts: &TrainOptions) -> (Arc<dyn Communicator>, Option<Arc<Metered>>) {
    match &opts.group {
        Some(g) if g.size() > 1 => {
            let m = Metered::new(g.clone());
            (m.clone(), Some(m))
        }
        _ => (crate::dist::solo(), None),
    }
}

/// `, 3 ranks of 86 or 85 images` (nothing for one process).
fn ranks_note(s: &Setup) -> String {
    let ranks = s.shard.ranks;
    if ranks == 1 {
        return String::new();
    }
    let (most, least) = (s.batch_size.div_ceil(ranks), s.batch_size / ranks);
    if most == least {
        format!(", {ranks} ranks of {most} images")
    } else {
        format!(", {ranks} ranks of {most} or {least} images")
    }
}

/// `derived.json`: the values training derives from the experiment.
fn derived(loaded: &Loaded, s: &Setup) -> serde_json::Value {
    let exp = &loaded.experiment;
    let trainable: usize = s.model.params.trainable().map(|p| p.var.elem_count()).sum();
    let (c, h, w) = exp.data.output_shape(s.ds.as_ref());
    let estimate = super::memory_guard::estimate(loaded, &s.plan);
    serde_json::json!({
        "seed": exp.seed,
        "method": run_dir::method_name(&s.plan),
        "dataset": s.ds.name(),
        "images": s.ds.len(),
        "batch_size": s.batch_size,
        "views_per_step": 2 * s.batch_size,
        "steps_per_epoch": s.steps_per_epoch,
        "total_steps": s.total,
        "epochs": s.total as f64 / s.steps_per_epoch as f64,
        "peak_lr": exp.schedule.peak_lr(s.batch_size),
        "lr_scaling": "lr × batch/256 when schedule.scale_with_batch",
        "parameters": s.model.params.num_parameters(),
        "trainable_parameters": trainable,
        "predicted_step_bytes": estimate.total(),
        "losses": s.plan.losses.iter().map(|&l| s.plan.id(l)).collect::<Vec<_>>(),
        "input": [c, h, w],
        "threads": s.threads,
        "ranks": s.shard.ranks,
        "sync_batch_norm": exp.train.sync_batch_norm,
        "precision": exp.precision,
        "convolutions": crate::nn::conv_op::backend(&s.device, exp.precision.dtype()),
        // `--set PATH=VALUE` as given; config.yaml holds the values they produced.
        "overrides": loaded.overrides.iter().map(|o| o.text.as_str()).collect::<Vec<_>>(),
    })
}

/// Continues the run in `run` from its newest checkpoint, in place: same run directory,
/// `metrics.csv` cut back to the checkpoint's step and appended to. With the same thread
/// count the result is bit-identical to a run that was never interrupted.
///
/// `opts.steps` replaces the run's length (which changes a decaying schedule's learning
/// rates, so the result then differs from the original run's); the other options are unused.
pub fn resume(run: &Path, opts: &TrainOptions) -> Result<TrainSummary> {
    resume_with(&run_dir::load_config(run)?, run, opts, None)
}

/// [`resume`] of the run whose `config.yaml` is `loaded`, measuring `monitor` as the run did.
pub fn resume_with(
    loaded: &Loaded,
    run: &Path,
    opts: &TrainOptions,
    monitor: Option<&mut dyn Monitor>,
) -> Result<TrainSummary> {
    let (group, meter) = metered(opts);
    let lead = group.rank() == 0;
    run_dir::check(run)?;
    check_monitor(loaded, &monitor)?;
    let ckpt = checkpoint::latest(run)?;
    let st = &ckpt.state;
    let total = opts.steps.unwrap_or(st.total_steps);
    if st.ranks != group.size() {
        return Err(CheckpointError::RanksChanged { dir: ckpt.dir.clone(), was: st.ranks, now: group.size() }.into());
    }
    if st.step >= total {
        if lead {
            eprintln!("{}: already complete at step {} of {total}", run.display(), st.step);
        }
        return Ok(TrainSummary {
            run_dir: run.to_path_buf(),
            steps: st.step,
            final_losses: vec![],
            first_losses: st.first_losses.clone(),
            images_per_sec: 0.0,
            seconds: 0.0,
            interrupted: false,
            communication: None,
            monitor: None,
        });
    }
    let mut s = Setup::new_in(loaded, Some(total), Some(st.threads), group)?;
    restore(loaded, run, &ckpt, &mut s, lead)?;
    let metrics = if lead {
        Some(Metrics::resume(&run.join(run_dir::METRICS), &s.plan, monitor.as_ref().map(|m| m.column()), st.step)?)
    } else {
        None
    };
    if lead {
        eprintln!(
            "resuming {} from step {} of {} (epoch {}, batch {}), checkpoint {}",
            run.display(),
            st.step,
            total,
            st.epoch,
            st.batch_in_epoch,
            ckpt.dir.display()
        );
    }
    s.total = total;
    let start = Start {
        step: st.step,
        epoch: st.epoch,
        batch_in_epoch: st.batch_in_epoch,
        elapsed_s: st.elapsed_s,
        first_losses: st.first_losses.clone(),
    };
    Trainer::new(loaded, s, run, opts, Watchers { metrics, meter, monitor }, &start)?.run(start)
}

/// Puts the checkpoint `ckpt` of `run` into `s` (weights, batch norm statistics, optimizer
/// state), refusing a checkpoint of another graph or seed, and warns where the run can go on
/// but will not match an uninterrupted one (another config outside the graph, another thread
/// count).
fn restore(loaded: &Loaded, run: &Path, ckpt: &checkpoint::Checkpoint, s: &mut Setup, lead: bool) -> Result<()> {
    let (st, exp) = (&ckpt.state, &loaded.experiment);
    // The weights are applied before the hash is judged, so that a changed graph is reported
    // with the keys that no longer fit (when some do not).
    let hash = checkpoint::graph_hash(exp);
    let applied = ckpt.apply(&s.model, s.optimizer.as_mut());
    if hash != st.graph_hash {
        return Err(CheckpointError::GraphChanged {
            checkpoint: ckpt.dir.clone(),
            config: run.join(run_dir::CONFIG),
            was: st.graph_hash.clone(),
            now: hash,
            mismatch: applied.err().map(|e| e.to_string()),
        }
        .into());
    }
    applied?;
    if st.seed != exp.seed {
        return Err(
            CheckpointError::SeedChanged { config: run.join(run_dir::CONFIG), now: exp.seed, was: st.seed }.into()
        );
    }
    let saved =
        crate::bounded::read_to_string(&ckpt.dir.join(checkpoint::CONFIG), crate::bounded::SMALL).unwrap_or_default();
    if saved != run_dir::resolved_yaml(exp)? && lead {
        eprintln!(
            "warning: {} differs from the checkpoint's copy outside the graph; continuing with it (the run will not match an uninterrupted one)",
            run.join(run_dir::CONFIG).display()
        );
    }
    if s.threads != st.threads && lead {
        eprintln!(
            "warning: {} threads now, {} when the checkpoint was written: results will not be bit-identical to an uninterrupted run",
            s.threads, st.threads
        );
    }
    Ok(())
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
    optimizer: &mut dyn Optimizer,
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

/// Applies `optimizer` to a node's gradients averaged over the ranks ([`GradReducer`]); nothing
/// once a loss of the step is not finite (as [`update_when_final`]).
fn apply_reduced(
    optimizer: &mut dyn Optimizer,
    model: &Model,
    r: Reduced,
    lr: f64,
    finite: bool,
) -> candle_core::Result<()> {
    if !finite || r.grads.is_empty() {
        return Ok(());
    }
    let params: Vec<_> = r.grads.iter().map(|(i, _)| model.params.params[*i].clone()).collect();
    let grads: Vec<_> = r.grads.into_iter().map(|(_, g)| Some(g)).collect();
    optimizer.step(&params, &grads, lr)
}

/// A run in progress: the setup, where the data stands, what was logged.
struct Trainer<'a, 'm> {
    loaded: &'a Loaded,
    s: Setup,
    dir: &'a Path,
    opts: &'a TrainOptions,
    /// Rank 0's: the other ranks write nothing.
    metrics: Option<Metrics>,
    /// Several ranks: the gradients' averaging, and the meter of the step's own collectives.
    reducer: Option<GradReducer>,
    meter: Option<Arc<Metered>>,
    steps_here: u64,
    bar: ProgressBar,
    graph_hash: String,
    clock: Instant,
    elapsed_before: f64,
    first: Vec<(String, f32)>,
    last: Vec<(String, f32)>,
    /// Images trained on since the last log line, and since when (monitor time left out).
    window: (Instant, usize),
    images_per_sec: f64,
    monitor: Option<&'m mut dyn Monitor>,
    /// The monitor's value at the current step, its last value, and what it cost so far.
    monitored: (Option<f64>, Option<f64>),
    cost: MonitorCost,
    /// Seconds spent in training steps (for the monitor's cost beside a step's).
    step_seconds: f64,
}

/// What watches a run without steering it: the metrics file (lead rank only), the byte meter
/// and the representation monitor.
struct Watchers<'m> {
    metrics: Option<Metrics>,
    meter: Option<Arc<Metered>>,
    monitor: Option<&'m mut dyn Monitor>,
}

impl<'a, 'm> Trainer<'a, 'm> {
    fn new(
        loaded: &'a Loaded,
        s: Setup,
        dir: &'a Path,
        opts: &'a TrainOptions,
        watch: Watchers<'m>,
        start: &Start,
    ) -> Result<Self> {
        let Watchers { metrics, meter, monitor } = watch;
        let bucket = (loaded.experiment.train.gradient_bucket_mb * 1048576.0).max(1.0) as usize;
        let reducer = if s.group.size() > 1 { Some(GradReducer::new(&s.group, bucket)?) } else { None };
        // Rank 0 alone draws the bar.
        let bar = if opts.quiet || s.group.rank() != 0 {
            ProgressBar::hidden()
        } else {
            crate::progress::bar(s.total, "steps", &loaded.experiment.name)
        };
        bar.set_position(start.step);
        // The ETA from this run's own steps, not from the steps before a resume.
        bar.reset_eta();
        Ok(Trainer {
            loaded,
            reducer,
            meter,
            steps_here: 0,
            graph_hash: checkpoint::graph_hash(&loaded.experiment),
            s,
            dir,
            opts,
            metrics,
            bar,
            clock: Instant::now(),
            elapsed_before: start.elapsed_s,
            first: start.first_losses.clone(),
            last: vec![],
            window: (Instant::now(), 0),
            images_per_sec: 0.0,
            monitor,
            monitored: (None, None),
            cost: MonitorCost::default(),
            step_seconds: 0.0,
        })
    }

    fn lead(&self) -> bool {
        self.s.group.rank() == 0
    }

    /// Whether to stop after this step: every rank must agree, or they would part ways (a
    /// Ctrl-C reaches each rank of an `mpirun` job at its own moment).
    fn stop_requested(&self) -> Result<bool> {
        let here = self.opts.stop.as_ref().is_some_and(|f| f.load(Ordering::SeqCst));
        if self.s.group.size() == 1 {
            return Ok(here);
        }
        let mut any = [u64::from(here)];
        self.s.group.all_reduce_sum(&mut any)?;
        Ok(any[0] > 0)
    }

    fn elapsed(&self) -> f64 {
        self.elapsed_before + self.clock.elapsed().as_secs_f64()
    }

    /// The steps from `start` to the run's end, logging, checkpointing and stopping on request.
    fn run(mut self, start: Start) -> Result<TrainSummary> {
        let exp = &self.loaded.experiment;
        let total = self.s.total;
        let (mut step, mut epoch, mut skip) = (start.step, start.epoch, start.batch_in_epoch);
        let mut interrupted = false;
        'epochs: while step < total {
            let loader = PairLoader::sharded(
                self.s.ds.clone(),
                &exp.data,
                self.s.batch_size,
                exp.seed,
                epoch as usize,
                self.s.shard,
            );
            // Batches of this epoch already trained on before the checkpoint: the loader is a
            // pure function of (seed, epoch), so skipping them puts the data where it was.
            let mut batch_in_epoch = skip;
            for batch in loader.skip(skip as usize) {
                if step >= total {
                    break 'epochs;
                }
                let t = Instant::now();
                self.step(&batch?, step)?;
                self.step_seconds += t.elapsed().as_secs_f64();
                step += 1;
                batch_in_epoch += 1;
                if self.after_step(step, epoch, batch_in_epoch)? {
                    interrupted = true;
                    break 'epochs;
                }
            }
            epoch += 1;
            skip = 0;
        }
        self.close(step, interrupted)?;
        Ok(self.summary(step, step - start.step, interrupted))
    }

    /// What follows step `step` (`batch_in_epoch` batches into epoch `epoch`): the bar, the
    /// monitor, the log line, a due or requested checkpoint. Whether to stop here: a stop was
    /// requested before the last step.
    fn after_step(&mut self, step: u64, epoch: u64, batch_in_epoch: u64) -> Result<bool> {
        let (train, total) = (&self.loaded.experiment.train, self.s.total);
        self.bar.inc(1);
        self.measure(step, total)?;
        if step.is_multiple_of(train.log_every) || step == total {
            self.log(step)?;
        }
        let stop = self.stop_requested()?;
        let due = train.checkpoint_every.is_some_and(|k| step.is_multiple_of(k));
        if step < total && (due || stop) {
            self.save(step, epoch, batch_in_epoch)?;
        }
        Ok(stop && step < total)
    }

    /// The closing lines after `step` steps and, for a run that reached its end, its last
    /// checkpoint.
    fn close(&mut self, step: u64, interrupted: bool) -> Result<()> {
        let (total, per_epoch) = (self.s.total, self.s.steps_per_epoch.max(1));
        if interrupted {
            self.bar.abandon();
            if self.lead() {
                eprintln!(
                    "interrupted: checkpoint at step {step} of {total} in {}; continue with `locograph resume {}`",
                    self.dir.display(),
                    self.dir.display()
                );
            }
        } else {
            self.bar.finish();
            // Every epoch has exactly `steps_per_epoch` batches, so the data position after
            // `step` steps is a function of it; `resume --steps` can continue from there.
            self.save(step, step / per_epoch, step % per_epoch)?;
            if self.lead() {
                eprintln!(
                    "done: {step} steps in {:.1} s; weights in {}",
                    self.elapsed(),
                    self.dir.join(run_dir::WEIGHTS).display()
                );
            }
        }
        Ok(())
    }

    /// The run's summary after `step` steps, `trained` of them in this process.
    fn summary(mut self, step: u64, trained: u64, interrupted: bool) -> TrainSummary {
        let communication = self.meter.as_ref().map(|m| Communication {
            ranks: self.s.group.size(),
            steps: self.steps_here,
            gradients: self.reducer.as_ref().map(GradReducer::stats).unwrap_or_default(),
            step_collectives: m.traffic(),
        });
        self.cost.step_seconds = self.step_seconds / trained.max(1) as f64;
        let monitor = self.monitored.1.map(|v| (v, self.cost.clone()));
        if let Some((v, c)) = &monitor {
            eprintln!(
                "monitor: {} passes of {:.2} s each ({:.1}× a training step of {:.2} s); last {} {v:.4}",
                c.passes,
                c.per_pass(),
                c.per_pass() / c.step_seconds.max(1e-9),
                c.step_seconds,
                self.monitor.as_ref().map_or("", |m| m.column()),
            );
        }
        TrainSummary {
            run_dir: self.dir.to_path_buf(),
            steps: step,
            seconds: self.elapsed(),
            final_losses: self.last,
            first_losses: self.first,
            images_per_sec: self.images_per_sec,
            interrupted,
            communication,
            monitor,
        }
    }

    /// The monitor's measurement after `step` steps, when one is due (every `every` steps and
    /// after the last); its time is kept out of the images/s.
    fn measure(&mut self, step: u64, total: u64) -> Result<()> {
        self.monitored.0 = None;
        let Some(m) = self.monitor.as_deref_mut() else { return Ok(()) };
        if !(step.is_multiple_of(m.every()) || step == total) {
            return Ok(());
        }
        let _span = info_span!("monitor", step).entered();
        let t = Instant::now();
        let v = m.measure(&self.s.plan, &self.s.model)?;
        let took = t.elapsed();
        self.window.0 += took;
        self.cost.passes += 1;
        self.cost.seconds += took.as_secs_f64();
        info!(step, value = v, seconds = took.as_secs_f64(), column = m.column(), "monitor");
        self.monitored = (Some(v), Some(v));
        Ok(())
    }

    /// One routed step on `batch`, each node updated as soon as its gradients are final
    /// ([`update_when_final`]). A non-finite loss stops the run before anything is saved: the
    /// last checkpoint stays the last good one.
    fn step(&mut self, batch: &crate::data::Batch, step: u64) -> Result<()> {
        let _span = info_span!("step", step).entered();
        let s = &mut self.s;
        let x = StepInput {
            images: batch.to_tensor(&s.device)?,
            labels: if s.plan.labels().is_some() { batch.row_labels(&s.device)? } else { None },
        };
        let lr = s.schedule.lr(step as usize);
        let (optimizer, model) = (&mut s.optimizer, &s.model);
        let out = match self.reducer.as_mut() {
            None => {
                let mut update = |f: GradsFinal<'_>| update_when_final(optimizer.as_mut(), model, f, lr);
                run_step_with(&s.plan, model, x, Hooks { grads_final: Some(&mut update), ..Hooks::default() })?
            }
            Some(reducer) => {
                // Each node's gradients go to the reducer as soon as they are final; each node
                // whose average is back is updated, in the same order on every rank.
                let wrap = candle_core::Error::wrap;
                let mut update = |f: GradsFinal<'_>| -> candle_core::Result<()> {
                    let grads = f.params.iter().filter_map(|&i| f.grads[i].take().map(|g| (i, g))).collect();
                    reducer.push(f.node.index(), grads).map_err(wrap)?;
                    let finite = f.losses.iter().all(|(_, v)| v.is_finite());
                    for r in reducer.ready().map_err(wrap)? {
                        apply_reduced(optimizer.as_mut(), model, r, lr, finite)?;
                    }
                    Ok(())
                };
                let out =
                    run_step_with(&s.plan, model, x, Hooks { grads_final: Some(&mut update), ..Hooks::default() })?;
                let finite = out.losses.iter().all(|(_, v)| v.is_finite());
                for r in reducer.finish()? {
                    apply_reduced(optimizer.as_mut(), model, r, lr, finite)?;
                }
                out
            }
        };
        self.steps_here += 1;
        self.last = out.losses.iter().map(|&(n, v)| (s.plan.id(n).to_string(), v)).collect();
        if let Some((id, v)) = self.last.iter().find(|(_, v)| !v.is_finite()) {
            self.bar.abandon();
            return Err(
                TrainError::Diverged { loss: id.clone(), value: *v, step, run_dir: self.dir.to_path_buf() }.into()
            );
        }
        // The moving averages follow the step's updates (BYOL updates its target after the
        // online network).
        super::ema::update(&s.model, step, s.total)?;
        if step == 0 {
            self.first = self.last.clone();
        }
        self.window.1 += s.batch_size;
        Ok(())
    }

    /// A `metrics.csv` row, a log line and the bar's message after `step` steps.
    fn log(&mut self, step: u64) -> Result<()> {
        let lr = self.s.schedule.lr(step as usize - 1);
        self.images_per_sec = self.window.1 as f64 / self.window.0.elapsed().as_secs_f64().max(1e-9);
        self.window = (Instant::now(), 0);
        let ips = self.images_per_sec;
        let elapsed_s = self.elapsed();
        let Some(metrics) = self.metrics.as_mut() else { return Ok(()) };
        metrics.write(&Row {
            step,
            epoch: step as f64 / self.s.steps_per_epoch as f64,
            lr,
            losses: &self.last,
            monitor: self.monitored.0,
            images_per_sec: ips,
            elapsed_s,
        })?;
        let msg: Vec<String> = self.last.iter().map(|(id, v)| format!("{id} {v:.4}")).collect();
        info!(step, lr, images_per_sec = ips, losses = %msg.join(" "), "train");
        let monitored = match (self.monitored.1, self.monitor.as_ref()) {
            (Some(v), Some(m)) => format!("  {} {v:.4}", m.column()),
            _ => String::new(),
        };
        self.bar.set_message(format!("{}  {ips:.1} img/s{monitored}", msg.join("  ")));
        Ok(())
    }

    /// A checkpoint (weights, optimizer state, data position) and then the run directory's
    /// latest `weights.safetensors`/`meta.json`: the checkpoint is what resume reads, so it must
    /// be durable first, and the metrics rows before it.
    fn save(&self, step: u64, epoch: u64, batch_in_epoch: u64) -> Result<()> {
        // Every rank must hold the weights rank 0 is about to write. Without synchronised batch
        // norm each rank's running statistics follow its own share: rank 0's are kept (as
        // PyTorch DDP's `broadcast_buffers`).
        let params = &self.s.model.params;
        if !self.loaded.experiment.train.sync_batch_norm {
            replicas::broadcast_vars(&self.s.group, params.buffers.iter().map(|b| &b.var), 0)?;
        }
        let named = params
            .params
            .iter()
            .map(|p| (p.name.as_str(), &p.var))
            .chain(params.buffers.iter().map(|b| (b.name.as_str(), &b.var)));
        replicas::check_replicas(&self.s.group, named)?;
        let Some(metrics) = self.metrics.as_ref() else { return Ok(()) };
        metrics.sync()?;
        let state = CheckpointState {
            format_version: checkpoint::FORMAT_VERSION,
            step,
            epoch,
            batch_in_epoch,
            total_steps: self.s.total,
            seed: self.loaded.experiment.seed,
            graph_hash: self.graph_hash.clone(),
            threads: self.s.threads,
            ranks: self.s.group.size(),
            elapsed_s: self.elapsed(),
            first_losses: self.first.clone(),
            files: Default::default(),
            locograph: env!("CARGO_PKG_VERSION").to_string(),
        };
        let yaml = run_dir::resolved_yaml(&self.loaded.experiment)?;
        checkpoint::save(self.dir, &yaml, &self.s.model, self.s.optimizer.as_ref(), state)?;
        run_dir::save(self.dir, self.loaded, &self.s.plan, &self.s.model, step)
    }
}
