//! The training loop of a stage-parallel run: `locograph run FILE` on an experiment with a
//! `placement:`, one rank per part of the placement (`mpirun -np N`; one process is a placement
//! on one rank).
//!
//! Each rank builds and updates only its own nodes ([`StageRank`]); every rank that runs the
//! input or the labels reads the same batches (the loader is a pure function of the seed: there
//! is no data sharding), the others read none. Rank 0 alone writes the run directory:
//! `metrics.csv` with every rank's losses (gathered at the logged steps), `ranks.json` with each
//! rank's nodes, busy and idle seconds per step, bytes sent and received and peak memory, and at
//! the end `weights.safetensors` with every rank's weights gathered, so that the directory reads
//! like a single-process run's (`eval`, `export`). No resumable checkpoint is written: each
//! rank's optimizer state and a pipelined rank's held-over links would have to travel too, and
//! `locograph resume` refuses the directory (it has no checkpoint).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use candle_core::{Device, Tensor};
use indicatif::ProgressBar;
use petgraph::graph::NodeIndex;
use tracing::info;

use super::ema;
use super::metrics::{Metrics, Row};
use super::model::Model;
use super::run_dir;
use super::stage::{RankStep, StageError, StageRank};
use super::step::{GradsFinal, StepInput};
use super::train::{update_when_final, TrainOptions, TrainSummary};
use super::{error::TrainError, setup};
use crate::config::{Loaded, PlacementConfig};
use crate::data::{Batch, DataError, Dataset, PairLoader, Shard};
use crate::dist::postbox::{PostStats, Postbox};
use crate::dist::Communicator;
use crate::graph::{explain, place, Placement, Plan};
use crate::{Error, Result};

/// The per-rank file beside `metrics.csv`.
pub const RANKS: &str = "ranks.json";

/// How many steps a rank may run ahead of a rank that reads its values.
const AHEAD: u64 = 2;

/// What one rank measured over the run.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct RankReport {
    pub rank: usize,
    pub nodes: Vec<String>,
    pub steps: u64,
    /// Mean seconds per step computing (and sending), and waiting for other ranks' messages.
    pub busy_s_per_step: f64,
    pub idle_s_per_step: f64,
    /// idle / (busy + idle).
    pub idle_fraction: f64,
    /// Wall seconds per step after the first (from the end of step 0 to the end of the last):
    /// the pipeline's period as this rank sees it, its filling left out.
    pub period_s: f64,
    /// Images per second at that period: the job's throughput is the slowest rank's.
    pub images_per_s: f64,
    pub sent_bytes: u64,
    pub received_bytes: u64,
    /// The rank's peak resident set size (`VmHWM`), 0 where unknown.
    pub peak_rss_bytes: u64,
}

/// Refuses what a stage-parallel job cannot do: another rank count than a given placement's
/// (more by a multiple would be a stage × data grid), a monitor (it reads the whole encoder on
/// one rank). `train.sync_batch_norm` and `negatives` need nothing: every rank's batch norms and
/// losses see the whole batch.
fn check(loaded: &Loaded, cfg: &PlacementConfig, ranks: usize) -> std::result::Result<(), StageError> {
    if let Some(&most) = cfg.nodes.values().max() {
        let placement = most + 1;
        if ranks > placement && ranks.is_multiple_of(placement) {
            return Err(StageError::DataParallel { placement, ranks });
        }
        if ranks != placement {
            return Err(StageError::Ranks { placement, ranks });
        }
    }
    if loaded.experiment.monitor.is_some() {
        return Err(StageError::Unsupported { what: "`monitor:` (it needs the whole encoder on one rank)".into() });
    }
    Ok(())
}

fn write(path: &Path, text: &str) -> Result<()> {
    std::fs::write(path, text).map_err(|e| Error::io(path, e))
}

/// Trains `loaded` (which has a `placement:`) stage-parallel over `opts.group`.
pub fn train(loaded: &Loaded, cfg: &PlacementConfig, opts: &TrainOptions) -> Result<TrainSummary> {
    let group: Arc<dyn Communicator> = opts.group.clone().unwrap_or_else(crate::dist::solo);
    let (rank, ranks) = (group.rank(), group.size());
    check(loaded, cfg, ranks)?;
    let exp = &loaded.experiment;
    let plan = setup::validate(loaded)?;
    let placement = place(&plan, loaded, cfg, ranks, 2 * exp.train.batch_size)?;
    let (device, ds) = setup::device_and_data(loaded, &plan, exp.train.threads)?;
    let batch_size = exp.train.batch_size;
    let steps_per_epoch = (ds.len() / batch_size).max(1) as u64;
    let total = opts.steps.or(exp.train.steps).unwrap_or_else(|| exp.train.epochs.unwrap_or(1) * steps_per_epoch);
    let schedule = exp.schedule.build(batch_size, total as usize, steps_per_epoch as usize);
    let model = Model::new_on(&plan, exp.seed, &device, &|n| placement.rank(n) == Some(rank))?
        .with_compute(exp.precision.dtype());
    let mut optimizer = exp.optimizer.build();

    let (dir, mut metrics) = open_run(loaded, &plan, opts, &group)?;
    if rank == 0 {
        announce(loaded, cfg, &plan, &placement, ranks, total);
    }
    let mut post = Postbox::open(&group, &device, AHEAD)?;
    let mut sr = StageRank::new(&plan, &placement, rank, cfg.schedule)?;
    let mut inputs = Inputs::new(loaded, &plan, &placement, rank, ds, &device)?;
    let bar =
        if opts.quiet || rank != 0 { ProgressBar::hidden() } else { crate::progress::bar(total, "steps", &exp.name) };
    let mut tally = Tally::new();
    let mut log = LossLog::new();
    for step in 0..total {
        let Some(input) = inputs.next()? else { break };
        let lr = schedule.lr(step as usize);
        let out = {
            let (opt, m) = (&mut optimizer, &model);
            let mut update = |f: GradsFinal<'_>| update_when_final(opt.as_mut(), m, f, lr);
            sr.step(&model, &mut post, &input, step, Some(&mut update))?
        };
        tally.add(&out, step);
        if let Some((n, v)) = out.losses.iter().find(|(_, v)| !v.is_finite()) {
            bar.abandon();
            return Err(TrainError::Diverged { loss: plan.id(*n).to_string(), value: *v, step, run_dir: dir }.into());
        }
        ema::update(&model, step, total)?;
        bar.inc(1);
        log.window.1 += batch_size;
        let done = step + 1;
        let logged = done.is_multiple_of(exp.train.log_every) || done == total;
        if rank == 0 && (step == 0 || logged) {
            log.record(&plan, step, &sr.gather_losses(&mut post, step, &out.losses)?);
        }
        if rank == 0 && logged {
            let epoch = done as f64 / steps_per_epoch as f64;
            log.write(metrics.as_mut(), &bar, done, epoch, lr, tally.clock.elapsed().as_secs_f64())?;
        }
    }
    bar.finish();
    let ended = Instant::now();
    let stats = post.close()?;
    let seconds = tally.clock.elapsed().as_secs_f64();
    let nodes = sr.nodes().into_iter().map(|n| plan.id(n).to_string()).collect();
    let mine = tally.report(rank, nodes, total, batch_size, &stats, ended);
    let reports = gather_reports(&group, &mine)?;
    let gathered = gather_weights(&group, &plan, &placement, &model, exp.seed, &device)?;
    if let (Some(m), Some(full)) = (metrics.as_ref(), gathered) {
        m.sync()?;
        save(&dir, loaded, &plan, &full, &reports, total)?;
        eprintln!("done: {total} steps in {seconds:.1} s; weights in {}", dir.join(run_dir::WEIGHTS).display());
        print_reports(&reports);
    }
    Ok(TrainSummary {
        run_dir: dir,
        steps: total,
        final_losses: log.last,
        first_losses: log.first,
        images_per_sec: log.images_per_sec,
        seconds,
        interrupted: false,
        communication: None,
        monitor: None,
    })
}

/// Rank 0's last files: every rank's report (`ranks.json`) and the gathered weights with the
/// run's metadata, as a single-process run leaves them.
fn save(dir: &Path, loaded: &Loaded, plan: &Plan, full: &Model, reports: &[RankReport], total: u64) -> Result<()> {
    let json = serde_json::to_string_pretty(reports).unwrap_or_default();
    write(&dir.join(RANKS), &json)?;
    run_dir::save(dir, loaded, plan, full, total)
}

/// One rank's step inputs: the batches of the seeded loader where the rank runs a reader of
/// the images or the labels, empty tensors where it runs neither (every reading rank reads the
/// same batches, so no data travels between ranks).
struct Inputs {
    batches: Box<dyn Iterator<Item = std::result::Result<Batch, DataError>>>,
    images: bool,
    labels: bool,
    empty: Tensor,
    device: Device,
}

impl Inputs {
    fn new(
        loaded: &Loaded,
        plan: &Plan,
        placement: &Placement,
        rank: usize,
        ds: Arc<dyn Dataset>,
        device: &Device,
    ) -> Result<Self> {
        let reads = |n| {
            plan.graph.neighbors_directed(n, petgraph::Direction::Outgoing).any(|c| placement.rank(c) == Some(rank))
        };
        let (exp, one) = (&loaded.experiment, Shard { rank: 0, ranks: 1 });
        let (data, batch_size, seed) = (exp.data.clone(), exp.train.batch_size, exp.seed);
        let batches = (0u64..)
            .flat_map(move |epoch| PairLoader::sharded(ds.clone(), &data, batch_size, seed, epoch as usize, one));
        Ok(Inputs {
            batches: Box::new(batches),
            images: reads(plan.input),
            labels: plan.labels().is_some_and(reads),
            empty: Tensor::zeros(0, candle_core::DType::F32, device)?,
            device: device.clone(),
        })
    }

    /// The next step's input; `None` when the loader ends.
    fn next(&mut self) -> Result<Option<StepInput>> {
        if !(self.images || self.labels) {
            return Ok(Some(StepInput { images: self.empty.clone(), labels: None }));
        }
        let Some(b) = self.batches.next() else { return Ok(None) };
        let b = b?;
        Ok(Some(StepInput {
            images: if self.images { b.to_tensor(&self.device)? } else { self.empty.clone() },
            labels: if self.labels { b.row_labels(&self.device)? } else { None },
        }))
    }
}

/// Rank 0's record of the losses: the first step's, the last logged step's, and the throughput
/// over the window since the previous logged step.
struct LossLog {
    first: Vec<(String, f32)>,
    last: Vec<(String, f32)>,
    window: (Instant, usize),
    images_per_sec: f64,
}

impl LossLog {
    fn new() -> Self {
        LossLog { first: vec![], last: vec![], window: (Instant::now(), 0), images_per_sec: 0.0 }
    }

    /// Every rank's losses of `step`, named by their node ids.
    fn record(&mut self, plan: &Plan, step: u64, all: &[(NodeIndex, f32)]) {
        let named: Vec<(String, f32)> = all.iter().map(|&(n, v)| (plan.id(n).to_string(), v)).collect();
        if step == 0 {
            self.first = named.clone();
        }
        self.last = named;
    }

    /// A `metrics.csv` row, a log line and the bar's message for the `done`th step.
    fn write(
        &mut self,
        metrics: Option<&mut Metrics>,
        bar: &ProgressBar,
        done: u64,
        epoch: f64,
        lr: f64,
        elapsed_s: f64,
    ) -> Result<()> {
        self.images_per_sec = self.window.1 as f64 / self.window.0.elapsed().as_secs_f64().max(1e-9);
        self.window = (Instant::now(), 0);
        let images_per_sec = self.images_per_sec;
        if let Some(m) = metrics {
            m.write(&Row { step: done, epoch, lr, losses: &self.last, monitor: None, images_per_sec, elapsed_s })?;
        }
        let msg: Vec<String> = self.last.iter().map(|(id, v)| format!("{id} {v:.4}")).collect();
        info!(step = done, lr, images_per_sec, losses = %msg.join(" "), "train");
        bar.set_message(format!("{}  {images_per_sec:.1} img/s", msg.join("  ")));
        Ok(())
    }
}

/// The run directory, named by rank 0's clock and broadcast to every rank; rank 0 alone creates
/// it and writes the resolved config, the explain table and the metrics file's header.
fn open_run(
    loaded: &Loaded,
    plan: &Plan,
    opts: &TrainOptions,
    group: &Arc<dyn Communicator>,
) -> Result<(PathBuf, Option<Metrics>)> {
    let exp = &loaded.experiment;
    let dir = opts
        .run_dir
        .clone()
        .unwrap_or_else(|| run_dir::new_dir(&run_dir::root(loaded, opts.runs_dir.as_deref()), &exp.name));
    let mut name = dir.to_string_lossy().into_owned().into_bytes();
    group.broadcast_bytes(&mut name, 0)?;
    let dir = PathBuf::from(String::from_utf8_lossy(&name).into_owned());
    if group.rank() != 0 {
        return Ok((dir, None));
    }
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    write(&dir.join(run_dir::CONFIG), &run_dir::resolved_yaml(exp)?)?;
    write(&dir.join(run_dir::EXPLAIN), &explain::table(plan))?;
    let metrics = Metrics::create(&dir.join(run_dir::METRICS), plan, None)?;
    eprintln!("run directory: {}", dir.display());
    Ok((dir, Some(metrics)))
}

/// What rank 0 prints as the run starts: the schedule, the step budget and each rank's nodes.
fn announce(loaded: &Loaded, cfg: &PlacementConfig, plan: &Plan, placement: &Placement, ranks: usize, total: u64) {
    let exp = &loaded.experiment;
    let (batch_size, views) = (exp.train.batch_size, 2 * exp.train.batch_size);
    eprintln!(
        "stage-parallel on {ranks} ranks ({:?} schedule), batch {batch_size} images = {views} views/step on every rank, {total} steps",
        cfg.schedule
    );
    if exp.train.checkpoint_every.is_some() {
        eprintln!(
            "warning: `train.checkpoint_every` is not used by a stage-parallel run: it writes no resumable checkpoint, only the final weights"
        );
    }
    let costs = placement.costs(plan, views, exp.precision.dtype().size_in_bytes(), 1);
    for (r, c) in costs.iter().enumerate() {
        eprintln!("  rank {r}: {}", c.nodes.join(" "));
    }
}

/// Where one rank's time went: seconds computing and waiting, and when its first step ended.
struct Tally {
    clock: Instant,
    busy: f64,
    idle: f64,
    after_first: Option<Instant>,
}

impl Tally {
    fn new() -> Self {
        Tally { clock: Instant::now(), busy: 0.0, idle: 0.0, after_first: None }
    }

    fn add(&mut self, out: &RankStep, step: u64) {
        self.busy += out.busy_s;
        self.idle += out.waiting_s;
        if step == 0 {
            self.after_first = Some(Instant::now());
        }
    }

    /// This rank's report after `total` steps of `batch_size` images, the last ending at `ended`.
    fn report(
        &self,
        rank: usize,
        nodes: Vec<String>,
        total: u64,
        batch_size: usize,
        stats: &PostStats,
        ended: Instant,
    ) -> RankReport {
        let period_s = match self.after_first {
            Some(t) if total > 1 => ended.duration_since(t).as_secs_f64() / (total - 1) as f64,
            _ => ended.duration_since(self.clock).as_secs_f64(),
        };
        let steps = total.max(1) as f64;
        RankReport {
            rank,
            nodes,
            steps: total,
            busy_s_per_step: self.busy / steps,
            idle_s_per_step: self.idle / steps,
            idle_fraction: self.idle / (self.busy + self.idle).max(1e-12),
            period_s,
            images_per_s: batch_size as f64 / period_s.max(1e-12),
            sent_bytes: stats.sent_bytes,
            received_bytes: stats.received_bytes,
            peak_rss_bytes: crate::malloc::peak_rss().unwrap_or(0),
        }
    }
}

/// Rank 0's closing lines: one per rank.
fn print_reports(reports: &[RankReport]) {
    for r in reports {
        eprintln!(
            "  rank {}: {:.1} images/s, busy {:.3} s/step, idle {:.3} s/step ({:.0} %), sent {:.1} MB, received {:.1} MB, peak RSS {:.0} MB",
            r.rank,
            r.images_per_s,
            r.busy_s_per_step,
            r.idle_s_per_step,
            100.0 * r.idle_fraction,
            r.sent_bytes as f64 / 1e6,
            r.received_bytes as f64 / 1e6,
            r.peak_rss_bytes as f64 / 1e6
        );
    }
}

/// Every rank's report, on rank 0 (collective).
fn gather_reports(group: &Arc<dyn Communicator>, mine: &RankReport) -> Result<Vec<RankReport>> {
    let numbers = [
        mine.steps as f64,
        mine.busy_s_per_step,
        mine.idle_s_per_step,
        mine.idle_fraction,
        mine.period_s,
        mine.images_per_s,
        mine.sent_bytes as f64,
        mine.received_bytes as f64,
        mine.peak_rss_bytes as f64,
    ];
    let (all, _) = group.all_gather(&numbers)?;
    let names = mine.nodes.join(" ").into_bytes();
    let (all_names, counts) = group.all_gather(&names)?;
    let mut at = 0;
    let mut out = vec![];
    for (r, (x, &count)) in all.chunks(numbers.len()).zip(&counts).enumerate() {
        let nodes = String::from_utf8_lossy(&all_names[at..at + count]).split(' ').map(String::from).collect();
        at += count;
        out.push(RankReport {
            rank: r,
            nodes,
            steps: x[0] as u64,
            busy_s_per_step: x[1],
            idle_s_per_step: x[2],
            idle_fraction: x[3],
            period_s: x[4],
            images_per_s: x[5],
            sent_bytes: x[6] as u64,
            received_bytes: x[7] as u64,
            peak_rss_bytes: x[8] as u64,
        });
    }
    Ok(out)
}

/// Every rank's parameters and batch norm statistics in one model, on rank 0 (`None` on the
/// others; collective). Rank `q` sends its tensors in its model's order, which is the whole
/// model's order restricted to `q`'s nodes (both are built node by node in graph order).
fn gather_weights(
    group: &Arc<dyn Communicator>,
    plan: &Plan,
    placement: &Placement,
    model: &Model,
    seed: u64,
    device: &candle_core::Device,
) -> Result<Option<Model>> {
    const TAG: u16 = 1;
    let rank = group.rank();
    let node_rank =
        |name: &str| plan.ids.get(name.split('.').next().unwrap_or_default()).and_then(|&n| placement.rank(n));
    let vars = |m: &Model| -> Vec<(String, candle_core::Var)> {
        m.params
            .params
            .iter()
            .map(|p| (p.name.clone(), p.var.clone()))
            .chain(m.params.buffers.iter().map(|b| (b.name.clone(), b.var.clone())))
            .collect()
    };
    if rank != 0 {
        for (_, v) in vars(model) {
            let data: Vec<f32> = v.as_tensor().flatten_all()?.to_vec1()?;
            group.send(&data, 0, TAG)?;
        }
        return Ok(None);
    }
    let full = Model::new(plan, seed, device)?;
    let own: std::collections::HashMap<String, candle_core::Var> = vars(model).into_iter().collect();
    for q in 1..group.size() {
        for (_, v) in vars(&full).into_iter().filter(|(n, _)| node_rank(n) == Some(q)) {
            let mut data = vec![0f32; v.elem_count()];
            group.recv(&mut data, q, TAG)?;
            v.set(&Tensor::from_vec(data, v.shape(), device)?)?;
        }
    }
    for (name, v) in vars(&full) {
        if let Some(mine) = own.get(&name) {
            v.set(mine.as_tensor())?;
        }
    }
    Ok(Some(full))
}
