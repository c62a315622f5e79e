//! The plan of a training step: the checked graph, which losses reach which nodes, the
//! execution order, and what each node costs.

use indexmap::IndexMap;
use petgraph::graph::{DiGraph, EdgeIndex, NodeIndex};
use petgraph::Direction;

use super::node::{GEdge, GNode};
use super::order::{Action, Order};
use super::reach::Reachability;
use crate::nn::Cost;

/// A validated graph with shapes, reachability, the execution order and per-node costs: what
/// the engine runs, what the memory guard and `locograph profile` read, from one model.
#[derive(Clone, Debug)]
pub struct Plan {
    pub graph: DiGraph<GNode, GEdge>,
    pub ids: IndexMap<String, NodeIndex>,
    pub input: NodeIndex,
    /// Loss nodes, in the order their forward completes.
    pub losses: Vec<NodeIndex>,
    pub reach: Reachability,
    pub order: Order,
    /// Per image, indexed like the graph's nodes (zero for `input`): from the layer specs.
    pub costs: Vec<Cost>,
}

/// The input edges of `n` and their producers, in the order `n`'s op reads them (the order of
/// its named inputs; a one-input node's single edge).
pub(crate) fn inputs_of(graph: &DiGraph<GNode, GEdge>, n: NodeIndex) -> Vec<(EdgeIndex, NodeIndex)> {
    use petgraph::visit::EdgeRef;
    let mut v: Vec<(usize, EdgeIndex, NodeIndex)> = graph
        .edges_directed(n, Direction::Incoming)
        .map(|e| {
            let rank = match (graph[n].config.as_ref().map(|c| c.inputs()), &e.weight().slot) {
                (Some(crate::config::Inputs::Named(names)), Some(s)) => {
                    names.iter().position(|x| x == s).unwrap_or(names.len())
                }
                _ => 0,
            };
            (rank, e.id(), e.source())
        })
        .collect();
    v.sort_by_key(|&(rank, e, _)| (rank, e.index()));
    v.into_iter().map(|(_, e, p)| (e, p)).collect()
}

impl Plan {
    pub fn node(&self, id: &str) -> Option<&GNode> {
        self.ids.get(id).map(|&i| &self.graph[i])
    }
    pub fn id(&self, n: NodeIndex) -> &str {
        &self.graph[n].id
    }
    /// What node `n` costs per image ([`Cost`]).
    pub fn cost(&self, n: NodeIndex) -> &Cost {
        &self.costs[n.index()]
    }
    /// An action as the traces print it: `F:res3`, `B:res3[1]` (backward group 1).
    pub fn action_name(&self, action: &Action) -> String {
        match *action {
            Action::Forward(n) => format!("F:{}", self.id(n)),
            Action::Backward { node, group } => format!("B:{}[{group}]", self.id(node)),
        }
    }
    /// The producer of `n`'s first input and the edge from it (`None` for `input` and `labels`).
    pub fn producer(&self, n: NodeIndex) -> Option<(EdgeIndex, NodeIndex)> {
        self.inputs(n).first().copied()
    }
    /// Every input edge of `n` and its producer, in the order the node's op reads them.
    pub fn inputs(&self, n: NodeIndex) -> Vec<(EdgeIndex, NodeIndex)> {
        inputs_of(&self.graph, n)
    }
    /// The `labels` node, when an edge reads the batch's labels.
    pub fn labels(&self) -> Option<NodeIndex> {
        self.ids.get(super::node::LABELS).copied()
    }
    pub fn edge_name(&self, e: EdgeIndex) -> String {
        let (a, b) = self.graph.edge_endpoints(e).expect("edge exists");
        format!("{} -> {}", self.graph[a].id, self.graph[b].id)
    }
    /// Trainable nodes in forward order.
    pub fn trainable_nodes(&self) -> Vec<NodeIndex> {
        self.order.forward_order().into_iter().filter(|&n| self.graph[n].is_trainable()).collect()
    }
}
