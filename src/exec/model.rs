//! The layers of a plan, built with seeded, named parameters.

use std::sync::Arc;

use candle_core::{DType, Device, Result, Tensor, Var};
use petgraph::graph::NodeIndex;
use tracing::info_span;

use crate::config::NodeConfig;
use crate::dist::Communicator;
use crate::graph::Plan;
use crate::loss::{CrossEntropy, Loss, Mse, NegCosine, NtXent};
use crate::nn::decoder::{decoder, Decoder};
use crate::nn::image_decoder::{image_decoder, ImageDecoder};
use crate::nn::stage::{stage, Stage};
use crate::nn::stem::{stem, Stem};
use crate::nn::{Layer, Link, ParamBuilder, ParamStore};

/// What one node computes. The engine sees only its [`Layer`]; exporters read the concrete
/// layers (`export::onnx` writes a stage's convolutions).
#[derive(Clone, Debug)]
pub enum NodeModule {
    Stem(Stem),
    Stage(Stage),
    Decoder(Decoder),
    ImageDecoder(ImageDecoder),
    Loss(Loss),
}

impl NodeModule {
    pub fn layer(&self) -> &dyn Layer {
        match self {
            NodeModule::Stem(m) => m,
            NodeModule::Stage(m) => m,
            NodeModule::Decoder(m) => m,
            NodeModule::ImageDecoder(m) => m,
            NodeModule::Loss(m) => m.layer(),
        }
    }
}

/// All modules, indexed like the plan's nodes, and their parameters.
#[derive(Clone, Debug)]
pub struct Model {
    pub modules: Vec<Option<NodeModule>>,
    /// Frozen nodes run batch norm in eval mode even while training.
    pub frozen: Vec<bool>,
    pub params: ParamStore,
    /// Indices into `params.params` of each node's parameters.
    pub node_params: Vec<Vec<usize>>,
    /// The moving-average nodes (`op: ema`) and the parameters they average.
    pub averages: Vec<Average>,
    /// The type stems, stages and decoders compute in (`precision:`); parameters stay f32 and
    /// are cast on use, so their gradients arrive in f32 ("master weights"). Losses compute in
    /// f32 whatever this says (a softmax over 2N similarities).
    pub compute: DType,
}

/// An `op: ema` node: its parameters paired with those of the node it averages.
#[derive(Clone, Debug)]
pub struct Average {
    pub node: NodeIndex,
    pub config: crate::config::EmaConfig,
    /// (this node's parameter, the averaged node's), indices into `Model::params.params`.
    pub params: Vec<(usize, usize)>,
}

/// Pairs every moving average's parameters with those of the node it averages, by the name
/// under the node id (`enc_t.block0.conv1.weight` ↔ `enc.block0.conv1.weight`).
fn averages(plan: &Plan, params: &ParamStore) -> Result<Vec<Average>> {
    let index: std::collections::HashMap<&str, usize> =
        params.params.iter().enumerate().map(|(i, p)| (p.name.as_str(), i)).collect();
    let mut out = vec![];
    for n in plan.graph.node_indices() {
        let Some(config) = plan.graph[n].ema.clone() else { continue };
        let prefix = format!("{}.", plan.id(n));
        let mut pairs = vec![];
        for (i, p) in params.params.iter().enumerate() {
            let Some(rest) = p.name.strip_prefix(&prefix) else { continue };
            let Some(&j) = index.get(format!("{}.{rest}", config.of).as_str()) else {
                candle_core::bail!("`{}` has `{}` but `{}` has no `{rest}`", plan.id(n), p.name, config.of)
            };
            if params.params[j].var.dims() != p.var.dims() {
                candle_core::bail!("`{}` and `{}` differ in shape", p.name, params.params[j].name);
            }
            pairs.push((i, j));
        }
        out.push(Average { node: n, config, params: pairs });
    }
    Ok(out)
}

impl Model {
    /// Builds every node; parameter names start with the node id.
    pub fn new(plan: &Plan, seed: u64, device: &Device) -> Result<Self> {
        Self::new_in(plan, seed, device, &crate::dist::solo(), false)
    }

    /// [`Model::new`] for one rank of `group`, which holds a share of each batch: the losses
    /// contrast across the ranks as their `negatives` say, and with `sync_batch_norm` every
    /// batch norm normalises with the whole batch's statistics. One rank: the same as `new`.
    pub fn new_in(
        plan: &Plan,
        seed: u64,
        device: &Device,
        group: &Arc<dyn Communicator>,
        sync_batch_norm: bool,
    ) -> Result<Self> {
        Self::build(plan, seed, device, group, sync_batch_norm, &|_| true)
    }

    /// The nodes `runs` selects (one rank's share of a stage-parallel job), with the same
    /// parameters as [`Model::new`] gives them (each is seeded by its name); the other nodes have
    /// no module and no parameters.
    pub fn new_on(plan: &Plan, seed: u64, device: &Device, runs: &dyn Fn(NodeIndex) -> bool) -> Result<Self> {
        Self::build(plan, seed, device, &crate::dist::solo(), false, runs)
    }

    fn build(
        plan: &Plan,
        seed: u64,
        device: &Device,
        group: &Arc<dyn Communicator>,
        sync_batch_norm: bool,
        runs: &dyn Fn(NodeIndex) -> bool,
    ) -> Result<Self> {
        let pb = ParamBuilder::new(seed, device, DType::F32);
        let pb = if sync_batch_norm { pb.sync_batch_norm(group.clone()) } else { pb };
        let n = plan.graph.node_count();
        let mut modules = vec![None; n];
        let mut frozen = vec![false; n];
        for idx in plan.graph.node_indices() {
            let node = &plan.graph[idx];
            let Some(cfg) = node.config.as_ref().filter(|_| runs(idx)) else { continue };
            let _span = info_span!("build", node = %node.id).entered();
            let in_c = plan.producer(idx).map(|(_, p)| plan.graph[p].shape.first().copied().unwrap_or(0)).unwrap_or(0);
            frozen[idx.index()] = cfg.is_frozen();
            // A moving average is not trained by gradients but runs batch norm in training mode.
            let b = pb.pp(&node.id).frozen(cfg.is_frozen() || node.ema.is_some());
            modules[idx.index()] = Some(match cfg {
                NodeConfig::Stem(s) => NodeModule::Stem(stem(s, in_c, &b)?),
                NodeConfig::Stage(s) => NodeModule::Stage(stage(s, in_c, &b)?),
                NodeConfig::Decoder(d) => NodeModule::Decoder(decoder(d, in_c, &b)?),
                NodeConfig::ImageDecoder(d) => NodeModule::ImageDecoder(image_decoder(d, in_c, &b)?),
                NodeConfig::NtXent(l) => {
                    NodeModule::Loss(Loss::NtXent(NtXent::new(l.temperature).in_group(l.negatives, group.clone())))
                }
                NodeConfig::CrossEntropy(_) => NodeModule::Loss(Loss::CrossEntropy(CrossEntropy)),
                NodeConfig::Mse(_) => NodeModule::Loss(Loss::Mse(Mse)),
                NodeConfig::NegCosine(_) => NodeModule::Loss(Loss::NegCosine(NegCosine)),
                // The plan holds the averaged node's config for a moving average.
                NodeConfig::Ema(e) => {
                    candle_core::bail!("`{}`: the moving average of `{}` was not resolved", node.id, e.of)
                }
            });
        }
        let params = pb.store();
        let mut node_params = vec![vec![]; n];
        for (i, p) in params.params.iter().enumerate() {
            let id = p.name.split('.').next().unwrap_or_default();
            if let Some(&ni) = plan.ids.get(id) {
                node_params[ni.index()].push(i);
            }
        }
        let averages = averages(plan, &params)?;
        let model = Model { modules, frozen, params, node_params, compute: DType::F32, averages };
        // A moving average starts as a copy of the node it averages.
        for a in &model.averages {
            for &(mine, of) in &a.params {
                model.params.params[mine].var.set(model.params.params[of].var.as_tensor())?;
            }
        }
        Ok(model)
    }

    /// Computes in `dtype` (mixed precision when not f32).
    pub fn with_compute(mut self, dtype: DType) -> Self {
        self.compute = dtype;
        self
    }

    pub fn module(&self, n: NodeIndex) -> Option<&NodeModule> {
        self.modules[n.index()].as_ref()
    }

    /// How many links node `n`'s training forward is cut into ([`Layer::links`]); 1 for
    /// `input`.
    pub fn links(&self, n: NodeIndex) -> usize {
        self.module(n).map_or(1, |m| m.layer().links())
    }

    /// Link `k` of node `n`'s forward ([`Layer::forward_link`]), its input cast to the node's
    /// compute type; a frozen node runs in eval mode.
    pub fn forward_link(&self, n: NodeIndex, k: usize, input: Option<Var>, x: &Tensor, train: bool) -> Result<Link> {
        let train = train && !self.frozen[n.index()];
        match self.module(n) {
            Some(m) if k == 0 => m.layer().forward_link(0, input, &x.to_dtype(self.dtype(m))?, train),
            Some(m) => m.layer().forward_link(k, input, x, train),
            None => Ok(Link::plain(input, x.clone())),
        }
    }

    /// Forward of one node; a frozen node always uses its running statistics.
    pub fn forward_node(&self, n: NodeIndex, x: &Tensor, train: bool) -> Result<Tensor> {
        let train = train && !self.frozen[n.index()];
        match self.module(n) {
            // A no-op in the compute type; otherwise the cast's backward returns f32 cotangents.
            Some(m) => m.layer().forward_t(&x.to_dtype(self.dtype(m))?, train),
            None => Ok(x.clone()),
        }
    }

    /// The forward of a node that reads several inputs (a loss), each floating-point input cast
    /// to the node's compute type (integer labels stay as they are).
    pub fn forward_inputs(&self, n: NodeIndex, xs: &[Tensor], train: bool) -> Result<Tensor> {
        let train = train && !self.frozen[n.index()];
        let Some(m) = self.module(n) else { candle_core::bail!("node {} has no layer", n.index()) };
        let dt = self.dtype(m);
        let xs: Vec<Tensor> = xs
            .iter()
            .map(|x| if x.dtype().is_float() { x.to_dtype(dt) } else { Ok(x.clone()) })
            .collect::<Result<_>>()?;
        m.layer().forward_inputs(&xs, train)
    }

    fn dtype(&self, m: &NodeModule) -> DType {
        match m {
            NodeModule::Loss(_) => DType::F32,
            _ => self.compute,
        }
    }
}
