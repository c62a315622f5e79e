//! The modules of a compiled graph, built with seeded, named parameters.

use candle_core::{DType, Device, Result, Tensor};
use petgraph::graph::NodeIndex;
use tracing::info_span;

use crate::config::NodeConfig;
use crate::graph::Compiled;
use crate::loss::nt_xent;
use crate::nn::batch_norm_op::BatchNormTrain;
use crate::nn::decoder::{decoder, Decoder};
use crate::nn::stage::{stage, Stage};
use crate::nn::stem::{stem, Stem};
use crate::nn::{ParamBuilder, ParamStore};

/// What one node computes.
#[derive(Clone, Debug)]
pub enum NodeModule {
    Stem(Stem),
    Stage(Stage),
    Decoder(Decoder),
    NtXent { temperature: f64 },
}

impl NodeModule {
    /// # Shapes
    /// `[2N, …]` → `[2N, …]` (a loss: `[2N, D]` → scalar).
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        match self {
            NodeModule::Stem(m) => m.forward_t(x, train),
            NodeModule::Stage(m) => m.forward_t(x, train),
            NodeModule::Decoder(m) => m.forward_t(x, train),
            NodeModule::NtXent { temperature } => nt_xent(x, *temperature),
        }
    }
}

/// What one piece of a node's forward returns.
#[derive(Clone, Debug)]
pub enum Piece {
    /// The piece's output.
    Plain(Tensor),
    /// The two terms of an output `relu(branch + shortcut)` (a residual block).
    Residual { branch: Tensor, shortcut: Tensor },
    /// A residual block whose branch ends in a training-mode batch norm: the output is
    /// `relu(op(z; γ, β) + shortcut)`, computed by the engine in one pass (`exec::chain`).
    Tail { z: Tensor, op: BatchNormTrain, gamma: Tensor, beta: Tensor, shortcut: Tensor },
}

/// All modules, indexed like the graph's nodes, and their parameters.
#[derive(Clone, Debug)]
pub struct Model {
    pub modules: Vec<Option<NodeModule>>,
    /// Frozen nodes run BatchNorm in eval mode even while training.
    pub frozen: Vec<bool>,
    pub params: ParamStore,
    /// Indices into `params.params` of each node's parameters.
    pub node_params: Vec<Vec<usize>>,
    /// The type stems, stages and decoders compute in (`precision:`); parameters stay f32 and
    /// are cast on use, so their gradients arrive in f32 ("master weights").
    pub compute: DType,
}

impl Model {
    /// Builds every node; parameter names start with the node id.
    pub fn new(c: &Compiled, seed: u64, device: &Device) -> Result<Self> {
        let pb = ParamBuilder::new(seed, device, DType::F32);
        let n = c.graph.node_count();
        let mut modules = vec![None; n];
        let mut frozen = vec![false; n];
        for idx in c.graph.node_indices() {
            let node = &c.graph[idx];
            let Some(cfg) = &node.config else { continue };
            let _span = info_span!("build", node = %node.id).entered();
            let in_c = c.producer(idx).map(|(_, p)| c.graph[p].shape.first().copied().unwrap_or(0)).unwrap_or(0);
            frozen[idx.index()] = cfg.is_frozen();
            let b = pb.pp(&node.id).frozen(cfg.is_frozen());
            modules[idx.index()] = Some(match cfg {
                NodeConfig::Stem(s) => NodeModule::Stem(stem(s, in_c, &b)?),
                NodeConfig::Stage(s) => NodeModule::Stage(stage(s, in_c, &b)?),
                NodeConfig::Decoder(d) => NodeModule::Decoder(decoder(d, in_c, &b)?),
                NodeConfig::NtXent(l) => NodeModule::NtXent { temperature: l.temperature },
            });
        }
        let params = pb.store();
        let mut node_params = vec![vec![]; n];
        for (i, p) in params.params.iter().enumerate() {
            let id = p.name.split('.').next().unwrap_or_default();
            if let Some(&ni) = c.ids.get(id) {
                node_params[ni.index()].push(i);
            }
        }
        Ok(Model { modules, frozen, params, node_params, compute: DType::F32 })
    }

    /// Computes in `dtype` (mixed precision when not f32).
    pub fn with_compute(mut self, dtype: DType) -> Self {
        self.compute = dtype;
        self
    }

    pub fn module(&self, n: NodeIndex) -> Option<&NodeModule> {
        self.modules[n.index()].as_ref()
    }

    /// How many pieces the engine cuts node `n`'s forward into, so that its backward can free
    /// them one by one: a stage's residual blocks, one piece for any other node.
    pub fn pieces(&self, n: NodeIndex) -> usize {
        match self.module(n) {
            Some(NodeModule::Stage(s)) => s.blocks().len().max(1),
            _ => 1,
        }
    }

    /// Piece `k` of node `n`'s forward ([`Model::pieces`]); piece 0 reads the node's input,
    /// piece `k` the output of piece `k − 1`. Chained, the pieces compute [`Model::forward_node`].
    pub fn forward_piece(&self, n: NodeIndex, k: usize, x: &Tensor, train: bool) -> Result<Piece> {
        let train = train && !self.frozen[n.index()];
        match self.module(n) {
            Some(NodeModule::Stage(s)) if !s.blocks().is_empty() => {
                let x = if k == 0 { s.resize_input(&x.to_dtype(self.compute)?)? } else { x.clone() };
                let block = &s.blocks()[k];
                let (z, shortcut) = block.forward_tail_inputs(&x, train)?;
                let bn = block.last_bn();
                if train {
                    if let Some(op) = bn.fused_train_op(&z)? {
                        let (gamma, beta) = (bn.weight().clone(), bn.bias().clone());
                        return Ok(Piece::Tail { z, op, gamma, beta, shortcut });
                    }
                }
                Ok(Piece::Residual { branch: bn.forward_t(&z, train)?, shortcut })
            }
            _ => Ok(Piece::Plain(self.forward_node(n, x, train)?)),
        }
    }

    /// Forward of one node; a frozen node always uses its running statistics.
    pub fn forward_node(&self, n: NodeIndex, x: &Tensor, train: bool) -> Result<Tensor> {
        let train = train && !self.frozen[n.index()];
        match self.module(n) {
            // Losses are computed in f32 whatever the precision (softmax over 2N similarities).
            Some(m @ NodeModule::NtXent { .. }) => m.forward_t(&x.to_dtype(DType::F32)?, train),
            // A no-op in f32; otherwise the cast's backward returns f32 cotangents upstream.
            Some(m) => m.forward_t(&x.to_dtype(self.compute)?, train),
            None => Ok(x.clone()),
        }
    }
}
