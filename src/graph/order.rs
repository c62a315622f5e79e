//! The execution order of one training step: one forward pass, with each backward pass run
//! as soon as its cotangents exist. (Not the learning-rate schedule: that is `optim::LrSchedule`.)
//!
//! The forward order is topological, preferring nodes that lead to the earliest loss, so GIM
//! and LoCo finish one unit (forward, loss, local backward) before starting the next. A
//! backward group runs as soon as every loss in it has delivered its cotangent: that is what
//! lets the executor free a unit's activations early (the paper's memory saving).

use std::collections::HashSet;

use petgraph::algo::toposort;
use petgraph::graph::{DiGraph, NodeIndex};
use petgraph::visit::EdgeRef;
use petgraph::Direction;

use super::node::{GEdge, GNode};
use super::reach::{BackwardGroup, Reachability};

/// One action of a step's execution order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Forward(NodeIndex),
    /// Backward group `group` of `node` (an index into `Reachability::groups(node)`).
    Backward {
        node: NodeIndex,
        group: usize,
    },
}

/// The actions of one training step, in the order the engine runs them.
#[derive(Clone, Debug)]
pub struct Order {
    pub actions: Vec<Action>,
}

impl Order {
    pub fn new(graph: &DiGraph<GNode, GEdge>, input: NodeIndex, reach: &Reachability) -> Self {
        let order = toposort(graph, None).expect("acyclic");
        let nn = graph.node_count();
        let prio = priorities(graph, &order, reach);
        let mut actions = vec![];
        let mut forwarded = vec![false; nn];
        let mut done: HashSet<(NodeIndex, usize)> = HashSet::new();
        let mut remaining_inputs: Vec<usize> =
            graph.node_indices().map(|n| graph.neighbors_directed(n, Direction::Incoming).count()).collect();
        // Every source: the images, and the labels where the graph reads them.
        let mut ready: Vec<NodeIndex> = graph.node_indices().filter(|&n| remaining_inputs[n.index()] == 0).collect();
        debug_assert!(ready.contains(&input));
        while !ready.is_empty() {
            let (pos, _) =
                ready.iter().enumerate().min_by_key(|(_, n)| (prio[n.index()], n.index())).expect("non-empty");
            let n = ready.swap_remove(pos);
            actions.push(Action::Forward(n));
            forwarded[n.index()] = true;
            for c in graph.neighbors_directed(n, Direction::Outgoing) {
                remaining_inputs[c.index()] -= 1;
                if remaining_inputs[c.index()] == 0 {
                    ready.push(c);
                }
            }
            // Run every backward group that has become ready, until none is.
            loop {
                let mut progressed = false;
                for &m in order.iter().rev().filter(|m| forwarded[m.index()]) {
                    for (gi, g) in reach.groups(m).iter().enumerate() {
                        if !done.contains(&(m, gi)) && can_run(graph, reach, &done, m, g) {
                            done.insert((m, gi));
                            actions.push(Action::Backward { node: m, group: gi });
                            progressed = true;
                        }
                    }
                }
                if !progressed {
                    break;
                }
            }
        }
        Order { actions }
    }

    pub fn forward_order(&self) -> Vec<NodeIndex> {
        self.actions
            .iter()
            .filter_map(|s| match s {
                Action::Forward(n) => Some(*n),
                _ => None,
            })
            .collect()
    }
}

/// Priority of each node: the rank of the earliest loss computed from it, losses ranked by
/// depth (the longest path from the input), so the forward finishes the lowest unit first.
fn priorities(graph: &DiGraph<GNode, GEdge>, order: &[NodeIndex], reach: &Reachability) -> Vec<usize> {
    let nn = graph.node_count();
    let mut depth = vec![0usize; nn];
    for &n in order {
        for p in graph.neighbors_directed(n, Direction::Incoming) {
            depth[n.index()] = depth[n.index()].max(depth[p.index()] + 1);
        }
    }
    let mut losses: Vec<NodeIndex> = reach.losses.clone();
    losses.sort_by_key(|l| (depth[l.index()], l.index()));
    let mut prio = vec![usize::MAX; nn];
    for (rank, &l) in losses.iter().enumerate() {
        let mut stack = vec![l];
        while let Some(m) = stack.pop() {
            if prio[m.index()] > rank {
                prio[m.index()] = rank;
                stack.extend(graph.neighbors_directed(m, Direction::Incoming));
            }
        }
    }
    prio
}

/// Whether backward group `g` of `m` has all its cotangents: for each of its losses (but `m`
/// itself, a loss node), every out-edge of `m` that loss flows along leads to a node whose
/// group for that loss has run.
fn can_run(
    graph: &DiGraph<GNode, GEdge>,
    reach: &Reachability,
    done: &HashSet<(NodeIndex, usize)>,
    m: NodeIndex,
    g: &BackwardGroup,
) -> bool {
    g.losses.iter().all(|&l| {
        l == m
            || graph.edges_directed(m, Direction::Outgoing).filter(|e| reach.flows(l, e.id())).all(|e| {
                let c = e.target();
                reach.groups(c).iter().position(|cg| cg.losses.contains(&l)).is_some_and(|cgi| done.contains(&(c, cgi)))
            })
    })
}
