//! Gradient reachability: which losses update which nodes, through which edges.
//!
//! Definitions (see docs/routing.md):
//! - loss ℓ *crosses* edge e unless e's `stop` names ℓ (or is `all`);
//! - the *region* of ℓ: nodes reached walking backwards from ℓ over edges it crosses;
//! - ℓ is *active* at node n when n is in its region and n, or something above n in the
//!   region, is trainable: only then does n need ℓ's cotangent;
//! - ℓ *flows* over edge p→n when it crosses the edge and is active at both ends;
//! - the *key* of ℓ at n: every edge ℓ flows over above n. Losses with the same key at n
//!   travel identical paths upwards, so their cotangents may be summed there: each distinct
//!   key is one backward pass through n (a [`BackwardGroup`]). Summing losses with different
//!   keys would leak one loss's gradient past a stop that only blocks the other.

use std::collections::{BTreeSet, HashMap};

use petgraph::algo::toposort;
use petgraph::graph::{DiGraph, EdgeIndex, NodeIndex};
use petgraph::visit::EdgeRef;
use petgraph::Direction;

use super::node::{GEdge, GNode};

/// One backward pass through a node: the losses whose cotangents are summed for it, and the
/// input edges whose gradient it must produce (empty: parameters only).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackwardGroup {
    pub losses: Vec<NodeIndex>,
    pub input_edges: Vec<EdgeIndex>,
}

/// Why a loss does or does not update a node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reason {
    Reaches,
    /// Every path to the loss crosses one of these stop edges.
    Stopped(Vec<EdgeIndex>),
    /// The loss is not computed from this node at all.
    NotDownstream,
}

#[derive(Clone, Debug)]
pub struct Reachability {
    /// All loss nodes, in graph order.
    pub losses: Vec<NodeIndex>,
    active: Vec<Vec<bool>>,
    flows: Vec<Vec<bool>>,
    groups: HashMap<NodeIndex, Vec<BackwardGroup>>,
}

fn crosses(graph: &DiGraph<GNode, GEdge>, loss: NodeIndex, e: EdgeIndex) -> bool {
    !graph[e].stop.blocks(&graph[loss].id)
}

impl Reachability {
    pub fn new(graph: &DiGraph<GNode, GEdge>, _input: NodeIndex) -> Self {
        let order = toposort(graph, None).expect("the graph was checked to be acyclic");
        let losses: Vec<NodeIndex> = graph.node_indices().filter(|&n| graph[n].is_loss()).collect();
        let (nn, ne) = (graph.node_count(), graph.edge_count());
        let mut active = vec![vec![false; nn]; losses.len()];
        let mut flows = vec![vec![false; ne]; losses.len()];
        for (li, &l) in losses.iter().enumerate() {
            // Region: backwards from the loss over crossed edges.
            let mut region = vec![false; nn];
            let mut stack = vec![l];
            region[l.index()] = true;
            while let Some(n) = stack.pop() {
                for e in graph.edges_directed(n, Direction::Incoming) {
                    if crosses(graph, l, e.id()) && !region[e.source().index()] {
                        region[e.source().index()] = true;
                        stack.push(e.source());
                    }
                }
            }
            // Active: in the region with something trainable at or above it (topological order
            // visits producers first).
            for &n in &order {
                if !region[n.index()] {
                    continue;
                }
                let above = graph
                    .edges_directed(n, Direction::Incoming)
                    .any(|e| crosses(graph, l, e.id()) && region[e.source().index()] && active[li][e.source().index()]);
                active[li][n.index()] = graph[n].is_trainable() || above;
            }
            for e in graph.edge_references() {
                flows[li][e.id().index()] =
                    crosses(graph, l, e.id()) && active[li][e.source().index()] && active[li][e.target().index()];
            }
        }
        let mut r = Reachability { losses, active, flows, groups: HashMap::new() };
        // Keys, producers first, then groups.
        let mut keys: Vec<Vec<BTreeSet<usize>>> = vec![vec![BTreeSet::new(); nn]; r.losses.len()];
        for &n in &order {
            for (flows, keys) in r.flows.iter().zip(keys.iter_mut()) {
                let mut k = BTreeSet::new();
                for e in graph.edges_directed(n, Direction::Incoming) {
                    if flows[e.id().index()] {
                        k.insert(e.id().index());
                        k.extend(keys[e.source().index()].iter().copied());
                    }
                }
                keys[n.index()] = k;
            }
            let mut groups: Vec<(BTreeSet<usize>, BackwardGroup)> = vec![];
            for (li, &l) in r.losses.iter().enumerate() {
                if !r.active[li][n.index()] {
                    continue;
                }
                let key = &keys[li][n.index()];
                match groups.iter_mut().find(|(k, _)| k == key) {
                    Some((_, g)) => g.losses.push(l),
                    None => {
                        let input_edges = graph
                            .edges_directed(n, Direction::Incoming)
                            .filter(|e| key.contains(&e.id().index()))
                            .map(|e| e.id())
                            .collect();
                        groups.push((key.clone(), BackwardGroup { losses: vec![l], input_edges }));
                    }
                }
            }
            // A group that feeds no input and updates no parameter would compute nothing.
            let groups: Vec<BackwardGroup> = groups
                .into_iter()
                .map(|(_, g)| g)
                .filter(|g| !g.input_edges.is_empty() || graph[n].is_trainable())
                .collect();
            if !groups.is_empty() {
                r.groups.insert(n, groups);
            }
        }
        r
    }

    fn li(&self, loss: NodeIndex) -> usize {
        self.losses.iter().position(|&l| l == loss).expect("a loss node")
    }

    /// Losses whose cotangent node `n` needs (for a trainable node: the losses that update it).
    pub fn reached_by(&self, n: NodeIndex) -> Vec<NodeIndex> {
        self.losses.iter().enumerate().filter(|(li, _)| self.active[*li][n.index()]).map(|(_, &l)| l).collect()
    }

    /// Whether `loss`'s gradient flows over edge `e`.
    pub fn flows(&self, loss: NodeIndex, e: EdgeIndex) -> bool {
        self.flows[self.li(loss)][e.index()]
    }

    /// Whether any loss's gradient flows over edge `e` (then its consumer reads a leaf copy).
    pub fn any_flows(&self, e: EdgeIndex) -> bool {
        self.flows.iter().any(|f| f[e.index()])
    }

    /// The backward passes through `n` (empty when `n` needs none).
    pub fn groups(&self, n: NodeIndex) -> &[BackwardGroup] {
        self.groups.get(&n).map(Vec::as_slice).unwrap_or(&[])
    }

    /// Why `loss` does or does not update `n`.
    pub fn reason(&self, graph: &DiGraph<GNode, GEdge>, n: NodeIndex, loss: NodeIndex) -> Reason {
        if self.active[self.li(loss)][n.index()] {
            return Reason::Reaches;
        }
        // Nodes that can reach the loss at all, ignoring stops.
        let mut upstream = vec![false; graph.node_count()];
        let mut stack = vec![loss];
        upstream[loss.index()] = true;
        while let Some(m) = stack.pop() {
            for p in graph.neighbors_directed(m, Direction::Incoming) {
                if !upstream[p.index()] {
                    upstream[p.index()] = true;
                    stack.push(p);
                }
            }
        }
        if !upstream[n.index()] {
            return Reason::NotDownstream;
        }
        // Walk down from n towards the loss; the first stop met on each path is the reason.
        let mut stopped = vec![];
        let mut seen = vec![false; graph.node_count()];
        let mut stack = vec![n];
        while let Some(m) = stack.pop() {
            for e in graph.edges_directed(m, Direction::Outgoing) {
                if !upstream[e.target().index()] {
                    continue;
                }
                if !crosses(graph, loss, e.id()) {
                    if !stopped.contains(&e.id()) {
                        stopped.push(e.id());
                    }
                } else if !seen[e.target().index()] {
                    seen[e.target().index()] = true;
                    stack.push(e.target());
                }
            }
        }
        stopped.sort();
        Reason::Stopped(stopped)
    }

    /// A sentence for an unreached trainable node.
    pub fn why_unreached(&self, graph: &DiGraph<GNode, GEdge>, n: NodeIndex) -> String {
        let mut parts = vec![];
        for &l in &self.losses {
            if let Reason::Stopped(edges) = self.reason(graph, n, l) {
                let names: Vec<String> = edges
                    .iter()
                    .map(|&e| {
                        let (a, b) = graph.edge_endpoints(e).expect("edge exists");
                        format!("`{} -> {}`", graph[a].id, graph[b].id)
                    })
                    .collect();
                parts.push(format!("{} is stopped at {}", graph[l].id, names.join(", ")));
            }
        }
        if parts.is_empty() {
            "no loss is computed from it".into()
        } else {
            parts.join("; ")
        }
    }
}
