//! What a training step holds, predicted from the plan before anything runs: the engine's
//! rules (`exec::step`) applied to the per-node costs over the execution order. This is where
//! a method's memory saving is visible without training: GIM's and LoCo's orders free each
//! unit before the next one's forward.
//!
//! Counted after each action, as the engine keeps things: each node's saved activations
//! ([`Cost::saved`](crate::nn::Cost)) from its forward to its last backward, then its output
//! until its consumers have read it; the leaf a consumer reads where gradient crosses an edge
//! (a copy, except of an output that already is a leaf); each cotangent until its node's
//! backward takes it. Not counted: parameters, gradients, optimizer state and the backward's
//! working set inside a node ([`WORKING_SET`] covers the last). `tests/memory.rs` checks the
//! prediction against what a counting allocator measures.

use petgraph::graph::NodeIndex;
use petgraph::visit::EdgeRef;
use petgraph::Direction;

use super::order::Action;
use super::plan::Plan;

/// Bytes held after each action of one step.
#[derive(Clone, Debug)]
pub struct HeldBytes {
    pub actions: Vec<(Action, usize)>,
}

impl HeldBytes {
    /// The largest, and the first action where it is reached.
    pub fn peak(&self) -> Option<(Action, usize)> {
        self.actions.iter().copied().fold(None, |best, s| match best {
            Some((_, b)) if b >= s.1 => best,
            _ => Some(s),
        })
    }
}

/// What a step's measured peak adds to the predicted activations: the gradients in flight
/// inside a block's backward (measured 4–22 % at ImageNet scale, docs/performance.md).
pub const WORKING_SET: f64 = 1.25;

/// The memory one training step needs, in bytes (f64: absurd configurations must not overflow).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MemoryEstimate {
    /// Activations held at the step's peak ([`Plan::held_bytes`]) × [`WORKING_SET`].
    pub activations: f64,
    /// Parameters and buffers, the parameters' gradients and the optimizer's state slots.
    pub parameters: f64,
    /// The working copies one op makes beside the held activations at most: oneDNN reorders a
    /// convolution's input and output into its blocked layout (`dnnl::conv_workspace_bytes`), so
    /// twice the largest node output. Transient (freed when the op returns), but at the peak.
    pub workspace: f64,
}

impl MemoryEstimate {
    pub fn total(&self) -> f64 {
        self.activations + self.parameters + self.workspace
    }
}

impl Plan {
    /// [`HeldBytes`] of one step on `views` images at `elem_bytes` per activation element
    /// (4 for f32).
    pub fn held_bytes(&self, views: usize, elem_bytes: usize) -> HeldBytes {
        self.held_bytes_on(views, elem_bytes, &|_| true)
    }

    /// [`Plan::held_bytes`] of the nodes `mine` selects, as one rank of a stage-parallel job
    /// holds them: its nodes' activations and outputs, a copy of every value it receives from
    /// another rank while its consumer needs it, and the cotangents sent to its nodes.
    pub fn held_bytes_on(&self, views: usize, elem_bytes: usize, mine: &dyn Fn(NodeIndex) -> bool) -> HeldBytes {
        let mut step = Simulated::new(self, views, elem_bytes);
        let actions = self
            .order
            .actions
            .iter()
            .map(|&action| {
                step.apply(action);
                (action, step.held(mine))
            })
            .collect();
        HeldBytes { actions }
    }

    /// Trained parameters and saved buffers of every node (elements).
    pub fn parameter_counts(&self) -> (u64, u64) {
        self.costs.iter().fold((0, 0), |(p, b), c| (p + c.params, b + c.buffers))
    }

    /// The memory a training step of `views` images needs, with `optimizer_slots` tensors of
    /// state per parameter (SGD with momentum and LARS 1, AdamW 2), activations at
    /// `elem_bytes` per element; master weights, gradients and optimizer state in f32.
    pub fn memory_estimate(&self, views: usize, elem_bytes: usize, optimizer_slots: usize) -> MemoryEstimate {
        let held = self.held_bytes(views, elem_bytes).peak().map_or(0, |p| p.1);
        let (params, buffers) = self.parameter_counts();
        let largest = self.costs.iter().map(|c| c.output).max().unwrap_or(0) as f64;
        MemoryEstimate {
            activations: held as f64 * WORKING_SET,
            parameters: (params as f64 * (2 + optimizer_slots) as f64 + buffers as f64) * 4.0,
            workspace: 2.0 * largest * (views * elem_bytes) as f64,
        }
    }

    /// One line for `locograph profile`: the step's predicted peak per view, and what its nodes
    /// keep in all (about what a step would hold if nothing were freed before the last loss).
    pub fn held_summary(&self) -> String {
        let held = self.held_bytes(1, 4);
        let all: usize = self.costs.iter().map(|c| c.saved as usize * 4).sum();
        let Some((action, peak)) = held.peak() else { return String::new() };
        format!(
            "this experiment's order holds at most {:.1} MB of activations per view (f32, after {}); its nodes keep {:.1} MB in all",
            peak as f64 / 1e6,
            self.action_name(&action),
            all as f64 / 1e6,
        )
    }
}

/// One step as the engine runs it, node by node: what each node holds (its output, its saved
/// activations) and what is alive after each action.
struct Simulated<'p> {
    plan: &'p Plan,
    /// Per node: output bytes, saved bytes, whether its output is a leaf already (a chained
    /// node's, when a backward will run through it).
    out: Vec<usize>,
    kept: Vec<usize>,
    is_leaf: Vec<bool>,
    /// Per node: backward groups and consumers still to run.
    groups_left: Vec<usize>,
    consumers_left: Vec<usize>,
    /// Per node: its value is alive; its graph (saved activations) is alive.
    value: Vec<bool>,
    graph: Vec<bool>,
    /// Per edge: its consumer reads a leaf.
    leaf: Vec<bool>,
    /// (node, the first loss of the group whose backward sends it, bytes)
    cots: Vec<(usize, NodeIndex, usize)>,
}

impl<'p> Simulated<'p> {
    fn new(plan: &'p Plan, views: usize, elem_bytes: usize) -> Self {
        let g = &plan.graph;
        let nn = g.node_count();
        let groups_left: Vec<usize> = g.node_indices().map(|n| plan.reach.groups(n).len()).collect();
        Simulated {
            plan,
            out: g.node_indices().map(|n| plan.cost(n).output_bytes(views, elem_bytes)).collect(),
            kept: g
                .node_indices()
                .map(|n| if g[n].config.is_some() { plan.cost(n).saved_bytes(views, elem_bytes) } else { 0 })
                .collect(),
            is_leaf: g.node_indices().map(|n| plan.cost(n).output_is_leaf && groups_left[n.index()] > 0).collect(),
            groups_left,
            consumers_left: g.node_indices().map(|n| g.neighbors_directed(n, Direction::Outgoing).count()).collect(),
            value: vec![false; nn],
            graph: vec![false; nn],
            leaf: vec![false; g.edge_count()],
            cots: vec![],
        }
    }

    /// A node's graph goes after its last backward, its value once its consumers have read it too.
    fn release(&mut self, n: usize) {
        if self.groups_left[n] == 0 {
            self.graph[n] = false;
            if self.consumers_left[n] == 0 {
                self.value[n] = false;
            }
        }
    }

    fn apply(&mut self, action: Action) {
        let (plan, g) = (self.plan, &self.plan.graph);
        match action {
            Action::Forward(n) => {
                self.graph[n.index()] = g[n].config.is_some();
                for (e, p) in plan.inputs(n) {
                    self.leaf[e.index()] = plan.reach.any_flows(e);
                    self.consumers_left[p.index()] -= 1;
                    self.release(p.index());
                }
                self.value[n.index()] = true;
            }
            Action::Backward { node: m, group } => {
                let grp = &plan.reach.groups(m)[group];
                self.cots.retain(|&(at, first, _)| !(at == m.index() && grp.losses.contains(&first)));
                for &e in &grp.input_edges {
                    let (p, _) = g.edge_endpoints(e).expect("edge exists");
                    self.cots.push((p.index(), grp.losses[0], self.out[p.index()]));
                }
                self.groups_left[m.index()] -= 1;
                if self.groups_left[m.index()] == 0 {
                    for e in g.edges_directed(m, Direction::Incoming) {
                        self.leaf[e.id().index()] = false;
                    }
                }
                self.release(m.index());
            }
        }
    }

    /// Bytes alive on the nodes `mine` selects.
    fn held(&self, mine: &dyn Fn(NodeIndex) -> bool) -> usize {
        let g = &self.plan.graph;
        // A leaf that is its producer's own output keeps that storage, counted once; a value
        // from another rank is a copy.
        let mut storage_alive: Vec<bool> = self.value.clone();
        let mut copies = 0;
        for e in g.edge_references() {
            let p = e.source().index();
            if self.leaf[e.id().index()] && mine(e.target()) {
                if self.is_leaf[p] && mine(e.source()) {
                    storage_alive[p] = true;
                } else {
                    copies = usize::saturating_add(copies, self.out[p]);
                }
            } else if mine(e.target()) && !mine(e.source()) && self.graph[e.target().index()] {
                // Received from another rank, read (detached) by a graph still alive here.
                copies = usize::saturating_add(copies, self.out[p]);
            }
        }
        let nodes = g.node_indices().filter(|&n| mine(n)).map(|n| {
            let n = n.index();
            if self.graph[n] {
                self.kept[n].max(self.out[n])
            } else if storage_alive[n] {
                self.out[n]
            } else {
                0
            }
        });
        let cots_here = self.cots.iter().filter(|c| mine(NodeIndex::new(c.0))).map(|c| c.2);
        nodes.chain(cots_here).fold(copies, usize::saturating_add)
    }
}
