//! What a training step holds, predicted from the shapes before anything runs: the engine's
//! own bookkeeping (`exec::engine`, whose `StepOutput::peak_held_bytes` it reproduces) replayed
//! over the compiled schedule. This is where a method's memory saving is visible without
//! training: GIM's and LoCo's schedules free each unit before the next one's forward.
//!
//! Counted after each schedule step, as the engine counts: each node's kept activations
//! ([`saved_elems`]) from its forward to its last backward, then its output until its
//! consumers have read it; the leaf a consumer reads where gradient crosses an edge (a copy,
//! except of a stage's output, which already is one); each cotangent until its node's backward
//! takes it. Not counted: parameters, gradients, optimizer state and the backward's working set
//! inside a node (measured: 4–22 % above this at ImageNet scale, docs/performance.md).

use petgraph::visit::EdgeRef;
use petgraph::Direction;

use super::profile::saved_elems;
use crate::config::NodeConfig;
use crate::graph::{Compiled, Step};

/// Bytes held after each schedule step.
#[derive(Clone, Debug)]
pub struct HeldBytes {
    pub steps: Vec<(Step, usize)>,
}

impl HeldBytes {
    /// The largest, and the first step where it is reached.
    pub fn peak(&self) -> Option<(Step, usize)> {
        self.steps.iter().copied().fold(None, |best, s| match best {
            Some((_, b)) if b >= s.1 => best,
            _ => Some(s),
        })
    }
}

/// One line for `locograph profile`: the step's predicted peak per view, and what its nodes
/// keep in all (about what a step would hold if nothing were freed before the last loss).
pub fn summary(c: &Compiled) -> String {
    let held = held_bytes(c, 1, 4);
    let all: usize = c.graph.node_indices().map(|n| kept_bytes(c, n, 1, 4)).sum();
    let Some((step, peak)) = held.peak() else { return String::new() };
    let at = c.step_name(&step);
    format!(
        "this experiment's schedule holds at most {:.1} MB of activations per view (f32, after {at}); its nodes keep {:.1} MB in all",
        peak as f64 / 1e6,
        all as f64 / 1e6,
    )
}

/// What node `n` keeps for its backward ([`saved_elems`] of its input shape), in bytes.
fn kept_bytes(c: &Compiled, n: petgraph::graph::NodeIndex, views: usize, elem_bytes: usize) -> usize {
    match (&c.graph[n].config, c.producer(n)) {
        (Some(cfg), Some((_, p))) => saved_elems(cfg, &c.graph[p].shape) as usize * views * elem_bytes,
        _ => 0,
    }
}

/// [`HeldBytes`] of one step on `views` images of the compiled input size, `elem_bytes` per
/// activation element (4 for f32).
pub fn held_bytes(c: &Compiled, views: usize, elem_bytes: usize) -> HeldBytes {
    let g = &c.graph;
    let nn = g.node_count();
    let elems = |n: petgraph::graph::NodeIndex| g[n].shape.iter().product::<usize>();
    let out: Vec<usize> =
        g.node_indices().map(|n| if g[n].is_loss() { elem_bytes } else { elems(n) * views * elem_bytes }).collect();
    let kept: Vec<usize> = g.node_indices().map(|n| kept_bytes(c, n, views, elem_bytes)).collect();
    let mut groups_left: Vec<usize> = g.node_indices().map(|n| c.reach.groups(n).len()).collect();
    // A stage run as a chain ends in a residual link whose output is a leaf already: reading
    // it as a leaf copies nothing.
    let is_leaf: Vec<bool> = g
        .node_indices()
        .map(|n| matches!(g[n].config, Some(NodeConfig::Stage(_))) && groups_left[n.index()] > 0)
        .collect();
    let mut consumers_left: Vec<usize> =
        g.node_indices().map(|n| g.neighbors_directed(n, Direction::Outgoing).count()).collect();
    let (mut value, mut graph) = (vec![false; nn], vec![false; nn]);
    let mut leaf = vec![false; g.edge_count()];
    // (node, the first loss of the group whose backward sends it, bytes)
    let mut cots: Vec<(usize, petgraph::graph::NodeIndex, usize)> = vec![];

    let release =
        |n: usize, value: &mut [bool], graph: &mut [bool], consumers_left: &[usize], groups_left: &[usize]| {
            if groups_left[n] == 0 {
                graph[n] = false;
                if consumers_left[n] == 0 {
                    value[n] = false;
                }
            }
        };

    let mut steps = vec![];
    for &step in &c.schedule.steps {
        match step {
            Step::Forward(n) => {
                if let Some((e, p)) = c.producer(n) {
                    leaf[e.index()] = c.reach.any_flows(e);
                    graph[n.index()] = g[n].config.is_some();
                    consumers_left[p.index()] -= 1;
                    release(p.index(), &mut value, &mut graph, &consumers_left, &groups_left);
                }
                value[n.index()] = true;
            }
            Step::Backward { node: m, group } => {
                let grp = &c.reach.groups(m)[group];
                cots.retain(|&(at, first, _)| !(at == m.index() && grp.losses.contains(&first)));
                for &e in &grp.input_edges {
                    let (p, _) = g.edge_endpoints(e).expect("edge exists");
                    cots.push((p.index(), grp.losses[0], out[p.index()]));
                }
                groups_left[m.index()] -= 1;
                if groups_left[m.index()] == 0 {
                    for e in g.edges_directed(m, Direction::Incoming) {
                        leaf[e.id().index()] = false;
                    }
                }
                release(m.index(), &mut value, &mut graph, &consumers_left, &groups_left);
            }
        }
        // A leaf that is its producer's own output keeps that storage, counted once.
        let mut storage_alive: Vec<bool> = value.clone();
        let mut copies = 0;
        for e in g.edge_references() {
            if leaf[e.id().index()] {
                let p = e.source().index();
                if is_leaf[p] {
                    storage_alive[p] = true;
                } else {
                    copies += out[p];
                }
            }
        }
        let nodes: usize = (0..nn)
            .map(|n| {
                if graph[n] {
                    kept[n].max(out[n])
                } else if storage_alive[n] {
                    out[n]
                } else {
                    0
                }
            })
            .sum();
        steps.push((step, nodes + copies + cots.iter().map(|c| c.2).sum::<usize>()));
    }
    HeldBytes { steps }
}
