//! Runs a compiled schedule: one forward pass, then per-loss backward passes routed by the
//! reachability groups, freeing each node's activations after its last backward.
//!
//! Every node reads a *leaf* copy of its producer's output when some loss's gradient must
//! cross that edge (a `Var`, so candle reports its gradient), and a detached tensor
//! otherwise. candle's autograd therefore never walks out of a node by itself: the engine
//! moves cotangents between nodes, tagged with the losses they carry, and a stop edge is
//! simply a cotangent that is never sent.

use candle_core::{Result, Tensor, Var};
use petgraph::graph::NodeIndex;
use petgraph::Direction;
use tracing::debug_span;

use super::model::Model;
use crate::config::NodeConfig;
use crate::graph::{Compiled, Step};

/// What one training step produced.
#[derive(Debug)]
pub struct StepOutput {
    /// Each loss's value (unweighted), in `Compiled::losses` order.
    pub losses: Vec<(NodeIndex, f32)>,
    /// Gradient of each parameter (`Model::params.params` order); `None` for frozen ones.
    pub grads: Vec<Option<Tensor>>,
    /// Backward passes run through each node (graph node order).
    pub passes: Vec<usize>,
    /// Largest number of activation bytes held at once: node outputs, leaf copies and
    /// cotangents, measured, plus an *estimate* of the intermediates candle's autograd keeps
    /// for each node whose backward is still to run (`eval::profile::saved_elems` from the
    /// node's input shape; candle does not expose its graph). Parameters, gradients and
    /// optimizer state are not included.
    pub peak_held_bytes: usize,
}

fn loss_weight(c: &Compiled, n: NodeIndex) -> f64 {
    match &c.graph[n].config {
        Some(NodeConfig::NtXent(l)) => l.weight,
        _ => 1.0,
    }
}

fn bytes(t: &Tensor) -> usize {
    t.elem_count() * t.dtype().size_in_bytes()
}

fn add(acc: &mut Option<Tensor>, g: &Tensor) -> Result<()> {
    *acc = Some(match acc.take() {
        None => g.clone(),
        Some(a) => (a + g)?,
    });
    Ok(())
}

/// One forward and all backward passes of `batch` (`[2N, C, H, W]`, the two views stacked).
pub fn run_step(c: &Compiled, model: &Model, batch: &Tensor) -> Result<StepOutput> {
    run_step_traced(c, model, batch, &mut |_, _| {})
}

/// [`run_step`], calling `after(step, held_bytes)` once each schedule step is done (and what it
/// no longer needs is dropped): how the memory benchmark attributes its peaks to steps.
pub fn run_step_traced(
    c: &Compiled,
    model: &Model,
    batch: &Tensor,
    after: &mut dyn FnMut(&Step, usize),
) -> Result<StepOutput> {
    let nn = c.graph.node_count();
    let mut values: Vec<Option<Tensor>> = vec![None; nn];
    let mut leaves: Vec<Option<Var>> = vec![None; c.graph.edge_count()];
    let mut cots: Vec<Vec<(Vec<NodeIndex>, Tensor)>> = vec![vec![]; nn];
    let mut consumers_left: Vec<usize> =
        c.graph.node_indices().map(|n| c.graph.neighbors_directed(n, Direction::Outgoing).count()).collect();
    let mut groups_left: Vec<usize> = c.graph.node_indices().map(|n| c.reach.groups(n).len()).collect();
    let mut grads: Vec<Option<Tensor>> = vec![None; model.params.params.len()];
    let mut passes = vec![0usize; nn];
    let mut losses = vec![];
    // Estimated bytes of each node's autograd graph beyond its output, while it is alive.
    let mut graph_bytes: Vec<usize> = vec![0; nn];
    let mut peak = 0usize;

    // Drops what a node no longer needs: its graph once its backwards are done, its value once
    // its consumers have read it.
    let release = |n: usize,
                   values: &mut Vec<Option<Tensor>>,
                   graph_bytes: &mut [usize],
                   consumers_left: &[usize],
                   groups_left: &[usize]| {
        if groups_left[n] == 0 {
            graph_bytes[n] = 0;
            if consumers_left[n] == 0 {
                values[n] = None;
            } else if let Some(v) = &values[n] {
                values[n] = Some(v.detach());
            }
        }
    };

    for step in &c.schedule.steps {
        match *step {
            Step::Forward(n) => {
                let out = if n == c.input {
                    batch.clone()
                } else {
                    let (e, p) = c.producer(n).expect("checked: one input per node");
                    let v = values[p.index()].as_ref().expect("producer ran before its consumer");
                    let _span = debug_span!("forward", node = %c.id(n)).entered();
                    let out = if c.reach.any_flows(e) {
                        let leaf = Var::from_tensor(&v.detach())?;
                        let out = model.forward_node(n, leaf.as_tensor(), true)?;
                        leaves[e.index()] = Some(leaf);
                        out
                    } else {
                        model.forward_node(n, &v.detach(), true)?
                    };
                    if let Some(cfg) = &c.graph[n].config {
                        let dims = v.dims();
                        let per_image = crate::eval::profile::saved_elems(cfg, dims.get(1..).unwrap_or(&[])) as usize;
                        let est = per_image * dims.first().copied().unwrap_or(0) * v.dtype().size_in_bytes();
                        graph_bytes[n.index()] = est.saturating_sub(bytes(&out));
                    }
                    consumers_left[p.index()] -= 1;
                    release(p.index(), &mut values, &mut graph_bytes, &consumers_left, &groups_left);
                    out
                };
                if c.graph[n].is_loss() {
                    let v = out.to_dtype(candle_core::DType::F32)?.to_scalar::<f32>()?;
                    losses.push((n, v));
                }
                values[n.index()] = Some(out);
            }
            Step::Backward { node: m, group: gi } => {
                let g = &c.reach.groups(m)[gi];
                let _span = debug_span!("backward", node = %c.id(m), losses = g.losses.len()).entered();
                let out = values[m.index()].as_ref().expect("forward ran before backward");
                let gs = if c.graph[m].is_loss() {
                    (out * loss_weight(c, m))?.backward()?
                } else {
                    // The cotangent entries tagged with this group's losses (each entry belongs
                    // to exactly one group: see graph::reach).
                    let mut cot: Option<Tensor> = None;
                    let mut rest = vec![];
                    for (ls, t) in cots[m.index()].drain(..) {
                        if g.losses.contains(&ls[0]) {
                            add(&mut cot, &t)?;
                        } else {
                            rest.push((ls, t));
                        }
                    }
                    cots[m.index()] = rest;
                    let cot =
                        cot.ok_or_else(|| candle_core::Error::Msg(format!("no cotangent reached `{}`", c.id(m))))?;
                    out.mul(&cot.detach())?.sum_all()?.backward()?
                };
                for &pi in &model.node_params[m.index()] {
                    let p = &model.params.params[pi];
                    if p.trainable {
                        if let Some(gr) = gs.get(p.var.as_tensor()) {
                            // candle detaches the gradient of every tensor it walks through but
                            // not of variables: a weight's gradient (`x_tᵀ ⋆ g` for a conv) still
                            // records the op that made it, and so keeps the node's whole forward
                            // graph alive. Detach, or no activation is freed before the step ends.
                            add(&mut grads[pi], &gr.detach())?;
                        }
                    }
                }
                for &e in &g.input_edges {
                    let (p, _) = c.graph.edge_endpoints(e).expect("edge exists");
                    let leaf = leaves[e.index()].as_ref().expect("a leaf exists where gradient flows");
                    let gin = gs.get(leaf.as_tensor()).ok_or_else(|| {
                        candle_core::Error::Msg(format!("no gradient reached the input of `{}`", c.id(m)))
                    })?;
                    // Detached for the same reason: the leaf is a variable to candle.
                    cots[p.index()].push((g.losses.clone(), gin.detach()));
                }
                passes[m.index()] += 1;
                groups_left[m.index()] -= 1;
                if groups_left[m.index()] == 0 {
                    for e in c.graph.edges_directed(m, Direction::Incoming) {
                        use petgraph::visit::EdgeRef;
                        leaves[e.id().index()] = None;
                    }
                }
                release(m.index(), &mut values, &mut graph_bytes, &consumers_left, &groups_left);
            }
        }
        let live: usize = values.iter().flatten().map(bytes).sum::<usize>()
            + graph_bytes.iter().sum::<usize>()
            + leaves.iter().flatten().map(|l| bytes(l.as_tensor())).sum::<usize>()
            + cots.iter().flat_map(|v| v.iter().map(|(_, t)| bytes(t))).sum::<usize>();
        peak = peak.max(live);
        after(step, live);
    }
    Ok(StepOutput { losses, grads, passes, peak_held_bytes: peak })
}

/// Forward only, in eval mode (BatchNorm uses running statistics): the output of `node`.
///
/// # Shapes
/// `[N, C, H, W]` → `[N, …]` (the node's output).
pub fn forward_to(c: &Compiled, model: &Model, batch: &Tensor, node: NodeIndex) -> Result<Tensor> {
    // The path from input to `node`; every node has one producer.
    let mut path = vec![node];
    while let Some((_, p)) = c.producer(*path.last().expect("non-empty")) {
        path.push(p);
    }
    path.reverse();
    let mut x = batch.detach();
    for &n in &path[1..] {
        let _span = debug_span!("eval_forward", node = %c.id(n)).entered();
        x = model.forward_node(n, &x, false)?.detach();
    }
    Ok(x)
}
