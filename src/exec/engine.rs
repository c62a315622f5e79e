//! Runs a compiled schedule: one forward pass, then per-loss backward passes routed by the
//! reachability groups, freeing each node's activations after its last backward.
//!
//! Every node reads a *leaf* copy of its producer's output when some loss's gradient must
//! cross that edge (a `Var`, so candle reports its gradient), and a detached tensor
//! otherwise. candle's autograd therefore never walks out of a node by itself: the engine
//! moves cotangents between nodes, tagged with the losses they carry, and a stop edge is
//! simply a cotangent that is never sent.
//!
//! Inside a node the same holds one level down: a stage runs as a chain of links, one per
//! residual block (`exec::chain`), and its last backward drops each block's graph as soon as
//! the block is done.

use candle_core::{Result, Tensor, Var};
use petgraph::graph::NodeIndex;
use petgraph::Direction;
use tracing::debug_span;

use super::chain::Link;
use super::model::Model;
use crate::config::NodeConfig;
use crate::graph::{Compiled, Step};

/// What one training step produced.
#[derive(Debug)]
pub struct StepOutput {
    /// Each loss's value (unweighted), in `Compiled::losses` order.
    pub losses: Vec<(NodeIndex, f32)>,
    /// Gradient of each parameter (`Model::params.params` order); `None` for frozen ones and
    /// for those a [`Hooks::grads_final`] hook took.
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

/// Bytes of distinct storages among `ts` (a leaf is often the very tensor its producer output).
fn distinct_bytes<'a>(ts: impl Iterator<Item = &'a Tensor>) -> usize {
    let mut seen = std::collections::HashSet::new();
    ts.filter(|t| {
        let (s, _) = t.storage_and_layout();
        seen.insert(&*s as *const _ as usize)
    })
    .map(bytes)
    .sum()
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
    run_step_with(c, model, batch, Hooks::default())
}

/// A node whose parameter gradients are final: its last backward has run.
pub struct GradsFinal<'a> {
    pub node: NodeIndex,
    /// The node's parameters, indices into `Model::params.params` (and into `grads`).
    pub params: &'a [usize],
    /// Every parameter's gradient so far; the node's entries are complete. A hook may take
    /// them (`grads[i].take()`): they are then missing from [`StepOutput::grads`].
    pub grads: &'a mut [Option<Tensor>],
    /// The losses computed so far (every loss whose gradient reaches the node is among them).
    pub losses: &'a [(NodeIndex, f32)],
}

/// [`Hooks::after_step`]: called with the schedule step just done and the bytes held.
pub type AfterStep<'a> = dyn FnMut(&Step, usize) + 'a;
/// [`Hooks::grads_final`].
pub type OnGradsFinal<'a> = dyn FnMut(GradsFinal<'_>) -> Result<()> + 'a;

/// What a caller sees while a step runs.
#[derive(Default)]
pub struct Hooks<'a> {
    /// After each schedule step, once what it no longer needs is dropped, with the bytes the
    /// engine holds: how the memory benchmark attributes its peaks to steps.
    pub after_step: Option<&'a mut AfterStep<'a>>,
    /// As soon as a node's gradients are final. The trainer applies the optimizer to the node
    /// here and drops its gradients, so that a GIM or LoCo step never holds more than the
    /// gradients of the units still running: a unit updates as soon as it is done, which is
    /// what local learning allows (and the same update as after the whole step: no later
    /// backward reads the node's weights).
    pub grads_final: Option<&'a mut OnGradsFinal<'a>>,
}

/// [`run_step`] with [`Hooks`].
pub fn run_step_with(c: &Compiled, model: &Model, batch: &Tensor, mut hooks: Hooks<'_>) -> Result<StepOutput> {
    let nn = c.graph.node_count();
    let mut values: Vec<Option<Tensor>> = vec![None; nn];
    // Each node's links whose graphs its backwards still need (last link last).
    let mut chains: Vec<Vec<Link>> = (0..nn).map(|_| vec![]).collect();
    let mut leaves: Vec<Option<Var>> = vec![None; c.graph.edge_count()];
    let mut cots: Vec<Vec<(Vec<NodeIndex>, Tensor)>> = vec![vec![]; nn];
    let mut consumers_left: Vec<usize> =
        c.graph.node_indices().map(|n| c.graph.neighbors_directed(n, Direction::Outgoing).count()).collect();
    let mut groups_left: Vec<usize> = c.graph.node_indices().map(|n| c.reach.groups(n).len()).collect();
    let mut grads: Vec<Option<Tensor>> = vec![None; model.params.params.len()];
    let mut passes = vec![0usize; nn];
    let mut losses = vec![];
    // Estimated bytes of each node's autograd graph beyond its output, while it is alive, per
    // link (scaled down as the node's last backward drops links).
    let mut graph_bytes: Vec<usize> = vec![0; nn];
    let mut link_bytes: Vec<usize> = vec![0; nn];
    let mut peak = 0usize;

    // Drops what a node no longer needs: its graph once its backwards are done, its value once
    // its consumers have read it.
    let release = |n: usize,
                   values: &mut Vec<Option<Tensor>>,
                   chains: &mut [Vec<Link>],
                   graph_bytes: &mut [usize],
                   consumers_left: &[usize],
                   groups_left: &[usize]| {
        if groups_left[n] == 0 {
            graph_bytes[n] = 0;
            chains[n].clear();
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
                    let input = if c.reach.any_flows(e) {
                        // No copy when the producer's output already is a leaf (a stage's).
                        let leaf = if v.is_variable() { Var::from_tensor(v)? } else { Var::from_tensor(&v.detach())? };
                        let t = leaf.as_tensor().clone();
                        leaves[e.index()] = Some(leaf);
                        t
                    } else {
                        v.detach()
                    };
                    let out = if groups_left[n.index()] == 0 {
                        // No backward will run here: one piece, no leaves.
                        model.forward_node(n, &input, true)?
                    } else {
                        let chain = &mut chains[n.index()];
                        let mut x = input;
                        for k in 0..model.pieces(n) {
                            let leaf = if k == 0 { None } else { Some(Var::from_tensor(&x)?) };
                            let piece = model.forward_piece(n, k, &x, true)?;
                            let link = Link::new(leaf, piece)?;
                            x = link.output.clone();
                            chain.push(link);
                        }
                        x
                    };
                    if let Some(cfg) = &c.graph[n].config {
                        let dims = v.dims();
                        let per_image = crate::eval::profile::saved_elems(cfg, dims.get(1..).unwrap_or(&[])) as usize;
                        let est = per_image * dims.first().copied().unwrap_or(0) * v.dtype().size_in_bytes();
                        let outputs: usize =
                            chains[n.index()].iter().map(Link::output_bytes).sum::<usize>().max(bytes(&out));
                        graph_bytes[n.index()] = est.saturating_sub(outputs);
                        link_bytes[n.index()] = graph_bytes[n.index()] / chains[n.index()].len().max(1);
                    }
                    consumers_left[p.index()] -= 1;
                    release(p.index(), &mut values, &mut chains, &mut graph_bytes, &consumers_left, &groups_left);
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
                let last = groups_left[m.index()] == 1;
                let cot = if c.graph[m].is_loss() {
                    // d(w·L)/dL: the loss's weight is its cotangent.
                    let out = values[m.index()].as_ref().expect("forward ran before backward");
                    Tensor::full(loss_weight(c, m) as f32, (), out.device())?.to_dtype(out.dtype())?
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
                    cot.ok_or_else(|| candle_core::Error::Msg(format!("no cotangent reached `{}`", c.id(m))))?
                };
                let mut cot = Some(cot);
                if last {
                    // The node's own output must not hold its graph through the last backward
                    // (the links give theirs up one by one): keep only the value, for the
                    // consumers still to read it.
                    if let Some(v) = values[m.index()].take() {
                        values[m.index()] = (consumers_left[m.index()] > 0).then(|| v.detach());
                    }
                }
                // The links from the last to the first; the node's last backward hands each
                // link's graph to candle, which frees it op by op.
                let chain = &mut chains[m.index()];
                for k in (0..chain.len()).rev() {
                    // Moved in: the cotangent is freed as soon as the link has used it.
                    let seed = cot.take().expect("each link below the first gets its cotangent from the one above");
                    let (gs, input) = if last {
                        let link = chain.pop().expect("k < len");
                        graph_bytes[m.index()] = graph_bytes[m.index()].saturating_sub(link_bytes[m.index()]);
                        link.last_backward(seed)?
                    } else {
                        (chain[k].backward(seed)?, chain[k].input.clone())
                    };
                    for &pi in &model.node_params[m.index()] {
                        let p = &model.params.params[pi];
                        if p.trainable {
                            if let Some(gr) = gs.get(p.var.as_tensor()) {
                                // candle detaches the gradient of every tensor it walks through but
                                // not of variables: a weight's gradient (`x_tᵀ ⋆ g` for a conv)
                                // still records the op that made it, and so keeps the node's whole
                                // forward graph alive. Detach, or no activation is freed early.
                                add(&mut grads[pi], &gr.detach())?;
                            }
                        }
                    }
                    if let Some(leaf) = &input {
                        let Some(gin) = gs.get(leaf.as_tensor()) else {
                            // Nothing below this link needs a gradient (e.g. GIM's frozen input
                            // side): the earlier links have no parameters reached either.
                            break;
                        };
                        cot = Some(gin.detach());
                    } else if k > 0 {
                        candle_core::bail!("link {k} of `{}` has no input leaf", c.id(m));
                    } else {
                        for &e in &g.input_edges {
                            let (p, _) = c.graph.edge_endpoints(e).expect("edge exists");
                            let leaf = leaves[e.index()].as_ref().expect("a leaf exists where gradient flows");
                            let gin = gs.get(leaf.as_tensor()).ok_or_else(|| {
                                candle_core::Error::Msg(format!("no gradient reached the input of `{}`", c.id(m)))
                            })?;
                            // Detached for the same reason: the leaf is a variable to candle.
                            cots[p.index()].push((g.losses.clone(), gin.detach()));
                        }
                    }
                }
                passes[m.index()] += 1;
                groups_left[m.index()] -= 1;
                if groups_left[m.index()] == 0 {
                    for e in c.graph.edges_directed(m, Direction::Incoming) {
                        use petgraph::visit::EdgeRef;
                        leaves[e.id().index()] = None;
                    }
                    if let Some(hook) = hooks.grads_final.as_mut() {
                        let params = &model.node_params[m.index()];
                        if !params.is_empty() {
                            hook(GradsFinal { node: m, params, grads: &mut grads, losses: &losses })?;
                        }
                    }
                }
                release(m.index(), &mut values, &mut chains, &mut graph_bytes, &consumers_left, &groups_left);
            }
        }
        let live: usize = distinct_bytes(
            values
                .iter()
                .flatten()
                .chain(chains.iter().flatten().map(|l| &l.output))
                .chain(leaves.iter().flatten().map(|l| l.as_tensor()))
                .chain(cots.iter().flat_map(|v| v.iter().map(|(_, t)| t))),
        ) + graph_bytes.iter().sum::<usize>();
        peak = peak.max(live);
        if let Some(after) = hooks.after_step.as_mut() {
            after(step, live);
        }
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
