//! From a loaded experiment to what training needs: the validated plan, the device, the
//! dataset, the model and the optimizer. Everything is checked (values, graph, the data's
//! shape, whether a step fits in memory) before the model is allocated.

use std::sync::Arc;

use candle_core::Device;

use super::error::TrainError;
use super::memory_guard;
use super::model::Model;
use crate::config::{check_values, ConfigError, ConfigErrors, DeviceKind, Loaded, NodeConfig};
use crate::data::{self, Dataset, Shard};
use crate::dist::{replicas, Communicator};
use crate::graph::{compile, Plan};
use crate::optim::{LrSchedule, Optimizer};
use crate::Result;

/// Picks the device named in the experiment; CUDA needs a `--features cuda` build.
pub fn device(kind: DeviceKind) -> Result<Device> {
    match kind {
        DeviceKind::Cpu => Ok(Device::Cpu),
        #[cfg(feature = "cuda")]
        DeviceKind::Cuda => Ok(Device::new_cuda(0)?),
        #[cfg(not(feature = "cuda"))]
        DeviceKind::Cuda => Err(TrainError::CudaNotBuilt.into()),
    }
}

/// Whether the experiment is right: its values and its graph (what `locograph validate`
/// runs). Whether it fits this machine is another question ([`memory_guard`]).
pub fn validate(loaded: &Loaded) -> Result<Plan> {
    match (compile(loaded), check_values(loaded)) {
        (Ok(plan), Ok(())) => Ok(plan),
        (Err(g), _) => Err(g.into()),
        (Ok(_), Err(v)) => Err(v.into()),
    }
}

/// What training needs, built from an experiment before the first step.
pub struct Setup {
    pub plan: Plan,
    pub device: Device,
    pub ds: Arc<dyn Dataset>,
    pub model: Model,
    pub optimizer: Box<dyn Optimizer>,
    pub schedule: LrSchedule,
    pub total: u64,
    pub steps_per_epoch: u64,
    pub batch_size: usize,
    /// Size of rayon's pool, recorded in checkpoints (determinism needs the same count).
    pub threads: usize,
    /// The ranks training together (one process: a group of one).
    pub group: Arc<dyn Communicator>,
    /// This rank's share of each global batch.
    pub shard: Shard,
}

impl Setup {
    /// Checks everything and only then allocates the model. `total` replaces the run's length;
    /// `threads` is the count to use when the experiment names none (a resumed run's).
    pub fn new(loaded: &Loaded, total: Option<u64>, threads: Option<usize>) -> Result<Self> {
        Self::new_in(loaded, total, threads, crate::dist::solo())
    }

    /// [`Setup::new`] for one rank of `group`: the model's losses and batch norms work across
    /// the ranks (`negatives`, `train.sync_batch_norm`) and its weights are rank 0's.
    pub fn new_in(
        loaded: &Loaded,
        total: Option<u64>,
        threads: Option<usize>,
        group: Arc<dyn Communicator>,
    ) -> Result<Self> {
        let plan = validate(loaded)?;
        memory_guard::check_fits_ranks(loaded, &plan, group.size(), crate::dist::launched_local_ranks().unwrap_or(1))?;
        let exp = &loaded.experiment;
        let (device, ds) = device_and_data(loaded, &plan, exp.train.threads.or(threads))?;
        let batch_size = exp.train.batch_size;
        let shard = Shard { rank: group.rank(), ranks: group.size() };
        if batch_size < shard.ranks {
            return Err(TrainError::BatchTooSmallForRanks { batch_size, ranks: shard.ranks }.into());
        }
        if !batch_size.is_multiple_of(shard.ranks) {
            let unweighted = plan.losses.iter().find_map(|&l| match &plan.graph[l].config {
                Some(c @ (NodeConfig::CrossEntropy(_) | NodeConfig::Mse(_) | NodeConfig::NegCosine(_))) => {
                    Some((plan.id(l).to_string(), c.op_name()))
                }
                _ => None,
            });
            if let Some((loss, op)) = unweighted {
                return Err(TrainError::UnevenShares { batch_size, ranks: shard.ranks, loss, op }.into());
            }
        }
        let steps_per_epoch = (ds.len() / batch_size).max(1) as u64;
        let total = total.or(exp.train.steps).unwrap_or_else(|| exp.train.epochs.unwrap_or(1) * steps_per_epoch);
        let schedule = exp.schedule.build(batch_size, total as usize, steps_per_epoch as usize);
        let model = Model::new_in(&plan, exp.seed, &device, &group, exp.train.sync_batch_norm)?
            .with_compute(exp.precision.dtype());
        // Seeded initialisation is already the same everywhere; the broadcast makes it so
        // whatever a rank's build did.
        let vars = model.params.params.iter().map(|p| &p.var).chain(model.params.buffers.iter().map(|b| &b.var));
        replicas::broadcast_vars(&group, vars, 0)?;
        let optimizer = exp.optimizer.build();
        Ok(Setup {
            plan,
            device,
            ds,
            model,
            optimizer,
            schedule,
            total,
            steps_per_epoch,
            batch_size,
            threads: rayon::current_num_threads(),
            group,
            shard,
        })
    }
}

/// The data pipeline's images must be what `input` says.
pub(crate) fn check_input(loaded: &Loaded, ds: &dyn Dataset) -> std::result::Result<(), ConfigErrors> {
    let exp = &loaded.experiment;
    let (c, h, w) = exp.data.output_shape(ds);
    if (c, h, w) != (exp.input.channels, exp.input.size, exp.input.size) {
        return Err(ConfigErrors(vec![ConfigError {
            location: loaded.locations.path("input"),
            path: "input".into(),
            message: format!(
                "the data pipeline gives {c}×{h}×{w} images but `input` says {}×{}×{}: set `data.augment.size`/`to_rgb` or `input`",
                exp.input.channels, exp.input.size, exp.input.size
            ),
        }]));
    }
    Ok(())
}

/// A graph that reads the batch's labels needs a labelled dataset, and each classifier as many
/// logits as the dataset has classes.
pub(crate) fn check_labels(plan: &Plan, ds: &dyn Dataset) -> std::result::Result<(), ConfigErrors> {
    let Some(labels) = plan.labels() else { return Ok(()) };
    let mut errors = vec![];
    for (e, n) in plan.graph.edges_directed(labels, petgraph::Direction::Outgoing).map(|e| {
        use petgraph::visit::EdgeRef;
        (e.id(), e.target())
    }) {
        let location = plan.graph[e].location.clone();
        let path = format!("edges[{}]", plan.graph[e].index);
        match ds.num_classes() {
            None => errors.push(ConfigError {
                location,
                path,
                message: format!("`{}` reads the batch's labels, but {} has none", plan.id(n), ds.name()),
            }),
            Some(classes) => {
                let logits = plan.inputs(n).first().map(|&(_, p)| plan.graph[p].shape.clone()).unwrap_or_default();
                if logits != [classes] {
                    errors.push(ConfigError {
                        location,
                        path,
                        message: format!(
                            "`{}` compares {logits:?} logits with the labels of {}, which has {classes} classes: set the classifier's `mlp.out: {classes}`",
                            plan.id(n),
                            ds.name()
                        ),
                    });
                }
            }
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(ConfigErrors(errors))
    }
}

/// The device and the dataset a run trains on, the data checked against the graph (its shape,
/// its labels) and the batch size. `threads` first sizes rayon's global pool, which candle's CPU kernels and the
/// gemm crate read.
pub(super) fn device_and_data(
    loaded: &Loaded,
    plan: &Plan,
    threads: Option<usize>,
) -> Result<(Device, Arc<dyn Dataset>)> {
    let exp = &loaded.experiment;
    if let Some(t) = threads {
        let _ = rayon::ThreadPoolBuilder::new().num_threads(t).build_global();
    }
    let device = device(exp.device)?;
    let ds: Arc<dyn Dataset> = data::open(&exp.data, &loaded.base_dir, None)?;
    check_input(loaded, ds.as_ref())?;
    check_labels(plan, ds.as_ref())?;
    let batch_size = exp.train.batch_size;
    if ds.len() < batch_size {
        // The loader drops the last incomplete batch, so an epoch would have no step at all.
        return Err(TrainError::DatasetTooSmall { dataset: ds.name(), images: ds.len(), batch_size }.into());
    }
    Ok((device, ds))
}
