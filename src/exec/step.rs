//! The state of one training step, and the two actions of an execution order that change it:
//! a node's forward and one backward group of a node.
//!
//! Every node reads a *leaf* copy of its producer's output when some loss's gradient must
//! cross that edge (a `Var`, so candle reports its gradient), and a detached tensor
//! otherwise. candle's autograd therefore never walks out of a node by itself: the step moves
//! cotangents between nodes, tagged with the losses they carry, and a stop edge is simply a
//! cotangent that is never sent.
//!
//! Inside a node the same holds one level down: a layer's forward is a chain of links
//! ([`crate::nn::Layer`]), and its last backward drops each link's graph as soon as the link
//! is done. What a link computes is the layer's business; here links are only run, seeded
//! and dropped.

use candle_core::backprop::GradStore;
use candle_core::{DType, Result, Tensor, Var};
use petgraph::graph::NodeIndex;
use petgraph::visit::EdgeRef;
use petgraph::Direction;
use tracing::debug_span;

use super::model::Model;
use crate::cpu_slice::leaf_copy;
use crate::graph::Plan;
use crate::nn::Link;

/// What a step reads: the stacked views (`[2N, C, H, W]`) and, for a graph that reads the
/// batch's `labels`, one class per view (`[2N]`, u32).
#[derive(Clone, Debug)]
pub struct StepInput {
    pub images: Tensor,
    pub labels: Option<Tensor>,
}

impl From<&Tensor> for StepInput {
    fn from(images: &Tensor) -> Self {
        StepInput { images: images.clone(), labels: None }
    }
}

/// A node whose parameter gradients are final: its last backward has run.
pub struct GradsFinal<'a> {
    pub node: NodeIndex,
    /// The node's parameters, indices into `Model::params.params` (and into `grads`).
    pub params: &'a [usize],
    /// Every parameter's gradient so far; the node's entries are complete. A hook may take
    /// them (`grads[i].take()`): they are then missing from the step's output.
    pub grads: &'a mut [Option<Tensor>],
    /// The losses computed so far (every loss whose gradient reaches the node is among them).
    pub losses: &'a [(NodeIndex, f32)],
}

/// What one training step produced.
#[derive(Debug)]
pub struct StepOutput {
    /// Each loss's value (unweighted), in `Plan::losses` order.
    pub losses: Vec<(NodeIndex, f32)>,
    /// Gradient of each parameter (`Model::params.params` order); `None` for frozen ones and
    /// for those a [`super::Hooks::grads_final`] hook took.
    pub grads: Vec<Option<Tensor>>,
    /// Backward passes run through each node (graph node order).
    pub passes: Vec<usize>,
}

/// Sees a node's gradients as soon as they are final ([`super::Hooks::grads_final`]).
pub type OnGradsFinal<'a> = dyn FnMut(GradsFinal<'_>) -> Result<()> + 'a;

/// What a step has computed and still holds, between actions.
pub struct StepState<'a> {
    plan: &'a Plan,
    model: &'a Model,
    /// Each node's output until its consumers have read it and its backwards are done.
    values: Vec<Option<Tensor>>,
    /// Each node's links whose graphs its backwards still need (last link last).
    chains: Vec<Vec<Link>>,
    /// Per edge: the leaf its consumer read, while gradient is still to come through it.
    leaves: Vec<Option<Var>>,
    /// Per node: cotangents at its output, each tagged with the losses it carries.
    cots: Vec<Vec<(Vec<NodeIndex>, Tensor)>>,
    consumers_left: Vec<usize>,
    groups_left: Vec<usize>,
    grads: Vec<Option<Tensor>>,
    passes: Vec<usize>,
    losses: Vec<(NodeIndex, f32)>,
}

/// A backward group held over to the next step (a pipelined rank's parameters-only group whose
/// cotangent comes back from another rank): the links of the step that ran its forward.
#[derive(Debug)]
pub struct Deferred {
    links: Vec<Link>,
}

impl<'a> StepState<'a> {
    pub fn new(plan: &'a Plan, model: &'a Model) -> Self {
        Self::new_on(plan, model, &|_| true)
    }

    /// A step that runs only the nodes `runs` selects (one rank of a stage-parallel job): the
    /// other nodes' values arrive through [`StepState::insert_value`], their cotangents leave
    /// through [`StepState::take_cotangents`], and only the selected consumers and backward
    /// groups are waited for before something is freed.
    pub fn new_on(plan: &'a Plan, model: &'a Model, runs: &dyn Fn(NodeIndex) -> bool) -> Self {
        let g = &plan.graph;
        let nn = g.node_count();
        StepState {
            plan,
            model,
            values: vec![None; nn],
            chains: (0..nn).map(|_| vec![]).collect(),
            leaves: vec![None; g.edge_count()],
            cots: vec![vec![]; nn],
            consumers_left: g
                .node_indices()
                .map(|n| g.neighbors_directed(n, Direction::Outgoing).filter(|&c| runs(c)).count())
                .collect(),
            groups_left: g.node_indices().map(|n| if runs(n) { plan.reach.groups(n).len() } else { 0 }).collect(),
            grads: vec![None; model.params.params.len()],
            passes: vec![0; nn],
            losses: vec![],
        }
    }

    /// Node `n`'s forward: the batch's images for `input` and labels for `labels`; else its layer
    /// on its producers' outputs, cut into links when a backward will run through it.
    pub fn forward(&mut self, n: NodeIndex, batch: &StepInput) -> Result<()> {
        let plan = self.plan;
        let out = if n == plan.input {
            batch.images.clone()
        } else if Some(n) == plan.labels() {
            match &batch.labels {
                Some(l) => l.clone(),
                None => candle_core::bail!("the graph reads `labels` but the batch has none"),
            }
        } else {
            let _span = debug_span!("forward", node = %plan.id(n)).entered();
            let inputs = plan.inputs(n);
            let mut xs = Vec::with_capacity(inputs.len());
            for &(e, p) in &inputs {
                let Some(v) = self.values[p.index()].as_ref() else {
                    candle_core::bail!("`{}` runs before its producer `{}`", plan.id(n), plan.id(p))
                };
                let (x, leaf) = if plan.reach.any_flows(e) {
                    // No copy when the producer's output already is a leaf (a chained layer's).
                    let leaf = if v.is_variable() { Var::from_tensor(v)? } else { leaf_copy(&v.detach())? };
                    (leaf.as_tensor().clone(), Some(leaf))
                } else {
                    (v.detach(), None)
                };
                self.leaves[e.index()] = leaf;
                xs.push(x);
            }
            let out = match (xs.len(), self.groups_left[n.index()]) {
                // No backward will run here: the whole layer at once, no leaves.
                (1, 0) => self.model.forward_node(n, &xs[0], true)?,
                (1, _) => {
                    let mut x = xs.pop().unwrap_or_else(|| batch.images.clone());
                    for k in 0..self.model.links(n) {
                        let leaf = if k == 0 { None } else { Some(leaf_copy(&x)?) };
                        let link = self.model.forward_link(n, k, leaf, &x, true)?;
                        x = link.output.clone();
                        self.chains[n.index()].push(link);
                    }
                    x
                }
                // Several inputs: one link, whose backward reaches every input's leaf.
                (_, left) => {
                    let out = self.model.forward_inputs(n, &xs, true)?;
                    if left > 0 {
                        self.chains[n.index()].push(Link::plain(None, out.clone()));
                    }
                    out
                }
            };
            for &(_, p) in &inputs {
                self.consumers_left[p.index()] -= 1;
                self.release(p);
            }
            out
        };
        if plan.graph[n].is_loss() {
            self.losses.push((n, out.to_dtype(DType::F32)?.to_scalar::<f32>()?));
        }
        self.values[n.index()] = Some(out);
        Ok(())
    }

    /// Backward group `group` of node `m`: its links from the last to the first, seeded with
    /// the group's cotangents; the parameter gradients accumulate, the input gradient goes to
    /// the producers the group's losses may reach. After the node's last group, `on_final` sees
    /// its gradients.
    pub fn backward(&mut self, m: NodeIndex, group: usize, on_final: Option<&mut OnGradsFinal<'_>>) -> Result<()> {
        let plan = self.plan;
        let g = &plan.reach.groups(m)[group];
        let _span = debug_span!("backward", node = %plan.id(m), losses = g.losses.len()).entered();
        let last = self.groups_left[m.index()] == 1;
        let cot = self.cotangent(m, &g.losses)?;
        if last {
            self.keep_value_only(m);
        }
        self.backward_links(m, group, cot, last)?;
        self.passes[m.index()] += 1;
        self.group_done(m, on_final)
    }

    /// A pipelined rank's backward group `group` of `m`, whose cotangent another rank sends back
    /// after this rank has moved on: this step's links are held over and returned, and the
    /// `earlier` step's links (with the cotangent that came back for them) run backward now, their
    /// parameter gradients added to this step's. The group must be `m`'s last and send no gradient
    /// below (parameters only: a LoCo shared stage's upper-unit group).
    pub fn defer(
        &mut self,
        m: NodeIndex,
        group: usize,
        earlier: Option<(Deferred, Tensor)>,
        on_final: Option<&mut OnGradsFinal<'_>>,
    ) -> Result<Deferred> {
        let plan = self.plan;
        if self.groups_left[m.index()] != 1 || !plan.reach.groups(m)[group].input_edges.is_empty() {
            candle_core::bail!(
                "`{}`: only a node's last, parameters-only backward group can wait a step for its cotangent",
                plan.id(m)
            )
        }
        let _span = debug_span!("deferred_backward", node = %plan.id(m)).entered();
        self.keep_value_only(m);
        let now = Deferred { links: std::mem::take(&mut self.chains[m.index()]) };
        if let Some((d, cot)) = earlier {
            self.chains[m.index()] = d.links;
            self.backward_links(m, group, cot, true)?;
            self.chains[m.index()].clear();
            self.passes[m.index()] += 1;
        }
        self.group_done(m, on_final)?;
        Ok(now)
    }

    /// The node's output must not hold its graph through its last backward (the links give
    /// theirs up one by one): keep only the value, for consumers still to read it.
    fn keep_value_only(&mut self, m: NodeIndex) {
        if let Some(v) = self.values[m.index()].take() {
            self.values[m.index()] = (self.consumers_left[m.index()] > 0).then(|| v.detach());
        }
    }

    /// Runs `m`'s links backward from the last, seeded with `cot` (the last backward gives each
    /// link's graph up as it goes).
    fn backward_links(&mut self, m: NodeIndex, group: usize, cot: Tensor, last: bool) -> Result<()> {
        let plan = self.plan;
        let mut cot = Some(cot);
        for k in (0..self.chains[m.index()].len()).rev() {
            // Moved in: the cotangent is freed as soon as the link has used it.
            let Some(seed) = cot.take() else { candle_core::bail!("link {k} of `{}` got no cotangent", plan.id(m)) };
            let (gs, input) = if last {
                let Some(link) = self.chains[m.index()].pop() else { break };
                link.last_backward(seed)?
            } else {
                let link = &self.chains[m.index()][k];
                (link.backward(seed)?, link.input.clone())
            };
            self.accumulate(m, &gs)?;
            match (&input, k) {
                (Some(leaf), _) => match gs.get(leaf.as_tensor()) {
                    Some(gin) => cot = Some(gin.detach()),
                    // Nothing below this link needs a gradient (e.g. GIM's cut-off input side):
                    // the earlier links have no parameters reached either.
                    None => break,
                },
                (None, 0) => self.send_input_gradients(m, group, &gs)?,
                (None, _) => candle_core::bail!("link {k} of `{}` has no input leaf", plan.id(m)),
            }
        }
        Ok(())
    }

    /// One of `m`'s backward groups is done; after its last, `on_final` sees its gradients.
    fn group_done(&mut self, m: NodeIndex, on_final: Option<&mut OnGradsFinal<'_>>) -> Result<()> {
        let plan = self.plan;
        self.groups_left[m.index()] -= 1;
        if self.groups_left[m.index()] == 0 {
            for e in plan.graph.edges_directed(m, Direction::Incoming) {
                self.leaves[e.id().index()] = None;
            }
            let params = &self.model.node_params[m.index()];
            if let (Some(hook), false) = (on_final, params.is_empty()) {
                hook(GradsFinal { node: m, params, grads: &mut self.grads, losses: &self.losses })?;
            }
        }
        self.release(m);
        Ok(())
    }

    /// The output of node `n`, computed on another rank.
    pub fn insert_value(&mut self, n: NodeIndex, value: Tensor) {
        self.values[n.index()] = Some(value);
    }

    /// Node `n`'s output, while the step holds it.
    pub fn value(&self, n: NodeIndex) -> Option<&Tensor> {
        self.values[n.index()].as_ref()
    }

    /// A cotangent at `n`'s output carrying `losses`, computed on another rank.
    pub fn push_cotangent(&mut self, n: NodeIndex, losses: Vec<NodeIndex>, cotangent: Tensor) {
        self.cots[n.index()].push((losses, cotangent));
    }

    /// The cotangents sent to node `n` (one per backward group that reached it), to hand to the
    /// rank that runs `n`.
    pub fn take_cotangents(&mut self, n: NodeIndex) -> Vec<(Vec<NodeIndex>, Tensor)> {
        std::mem::take(&mut self.cots[n.index()])
    }

    /// The cotangent at `m`'s output for a group of `losses`: a loss's weight at the loss itself
    /// (d(w·L)/dL), elsewhere the sum of the cotangents tagged with the group's losses (each
    /// entry belongs to exactly one group: see `graph::reach`).
    fn cotangent(&mut self, m: NodeIndex, losses: &[NodeIndex]) -> Result<Tensor> {
        let plan = self.plan;
        if plan.graph[m].is_loss() {
            let Some(out) = self.values[m.index()].as_ref() else {
                candle_core::bail!("loss `{}` has no value to differentiate", plan.id(m))
            };
            let w = plan.graph[m].config.as_ref().map_or(1.0, |c| c.loss_weight());
            return Tensor::full(w as f32, (), out.device())?.to_dtype(out.dtype());
        }
        let mut sum: Option<Tensor> = None;
        let mut rest = vec![];
        for (ls, t) in self.cots[m.index()].drain(..) {
            if losses.contains(&ls[0]) {
                sum = Some(match sum.take() {
                    None => t,
                    Some(a) => (a + t)?,
                });
            } else {
                rest.push((ls, t));
            }
        }
        self.cots[m.index()] = rest;
        sum.ok_or_else(|| candle_core::Error::Msg(format!("no cotangent reached `{}`", plan.id(m))))
    }

    /// Adds node `m`'s parameter gradients found in `gs`.
    fn accumulate(&mut self, m: NodeIndex, gs: &GradStore) -> Result<()> {
        for &pi in &self.model.node_params[m.index()] {
            let p = &self.model.params.params[pi];
            let Some(gr) = p.trainable.then(|| gs.get(p.var.as_tensor())).flatten() else { continue };
            // candle detaches the gradient of every tensor it walks through but not of
            // variables: a weight's gradient (`x_tᵀ ⋆ g` for a conv) still records the op that
            // made it, and so keeps the node's whole forward graph alive. Detach, or no
            // activation is freed early.
            let gr = gr.detach();
            self.grads[pi] = Some(match self.grads[pi].take() {
                None => gr,
                Some(a) => (a + gr)?,
            });
        }
        Ok(())
    }

    /// The gradient at each input edge of group `group` of `m`, sent to its producer tagged
    /// with the group's losses.
    fn send_input_gradients(&mut self, m: NodeIndex, group: usize, gs: &GradStore) -> Result<()> {
        let plan = self.plan;
        let g = &plan.reach.groups(m)[group];
        for &e in &g.input_edges {
            let Some((p, _)) = plan.graph.edge_endpoints(e) else { continue };
            let Some(leaf) = self.leaves[e.index()].as_ref() else {
                candle_core::bail!("no leaf at {} though gradient flows there", plan.edge_name(e))
            };
            let Some(gin) = gs.get(leaf.as_tensor()) else {
                candle_core::bail!("no gradient reached the input of `{}`", plan.id(m))
            };
            // Detached for the same reason as a weight's: the leaf is a variable to candle.
            self.cots[p.index()].push((g.losses.clone(), gin.detach()));
        }
        Ok(())
    }

    /// Drops what node `n` no longer needs: its links once its backwards are done, its value
    /// once its consumers have read it too.
    fn release(&mut self, n: NodeIndex) {
        let n = n.index();
        if self.groups_left[n] == 0 {
            self.chains[n].clear();
            if self.consumers_left[n] == 0 {
                self.values[n] = None;
            } else if let Some(v) = &self.values[n] {
                self.values[n] = Some(v.detach());
            }
        }
    }

    /// Every activation tensor the step holds now: node outputs, link outputs, leaves and
    /// cotangents (a storage may appear more than once: a leaf is often its producer's output).
    /// What candle's graphs keep inside the links is not visible here.
    pub fn held_tensors(&self) -> impl Iterator<Item = &Tensor> {
        self.values
            .iter()
            .flatten()
            .chain(self.chains.iter().flatten().map(|l| &l.output))
            .chain(self.leaves.iter().flatten().map(|l| l.as_tensor()))
            .chain(self.cots.iter().flat_map(|v| v.iter().map(|(_, t)| t)))
    }

    /// The losses computed so far, in forward order.
    pub fn losses(&self) -> &[(NodeIndex, f32)] {
        &self.losses
    }

    /// What the step produced.
    pub fn finish(self) -> StepOutput {
        StepOutput { losses: self.losses, grads: self.grads, passes: self.passes }
    }
}
