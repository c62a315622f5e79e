//! The naive reference the engine is tested against: one full forward per loss, with an
//! explicit detach on every edge that stops that loss, one backward per loss, and the
//! parameter gradients summed. Correct by construction, and (#losses)× the forward cost.
//!
//! The same in PyTorch, for a chain of nodes:
//! ```python
//! grads = 0
//! for loss in losses:
//!     h = x
//!     for node, edge in path_to(loss):
//!         h = node(h.detach() if loss in edge.stop else h)
//!     grads += torch.autograd.grad(loss.weight * h, params, allow_unused=True)
//! ```

use candle_core::{Result, Tensor};
use petgraph::algo::toposort;

use super::model::Model;
use super::step::StepInput;
use crate::config::NodeConfig;
use crate::graph::Plan;

/// Parameter gradients (`Model::params.params` order) summed over all losses.
pub fn reference_grads(c: &Plan, model: &Model, batch: impl Into<StepInput>) -> Result<Vec<Option<Tensor>>> {
    let batch = batch.into();
    let order = toposort(&c.graph, None).map_err(|_| candle_core::Error::Msg("cycle".into()))?;
    let mut total: Vec<Option<Tensor>> = vec![None; model.params.params.len()];
    for &l in &c.reach.losses {
        let lid = c.id(l).to_string();
        let mut values: Vec<Option<Tensor>> = vec![None; c.graph.node_count()];
        for &n in &order {
            let v = if n == c.input {
                batch.images.clone()
            } else if Some(n) == c.labels() {
                batch.labels.clone().ok_or_else(|| candle_core::Error::Msg("the graph reads labels".into()))?
            } else {
                let mut xs = vec![];
                for (e, p) in c.inputs(n) {
                    let x =
                        values[p.index()].clone().ok_or_else(|| candle_core::Error::Msg("producer first".into()))?;
                    xs.push(if c.graph[e].stop.blocks(&lid) { x.detach() } else { x });
                }
                match xs.as_slice() {
                    [x] => model.forward_node(n, x, true)?,
                    _ => model.forward_inputs(n, &xs, true)?,
                }
            };
            values[n.index()] = Some(v);
        }
        let w = c.graph[l].config.as_ref().map_or(1.0, NodeConfig::loss_weight);
        let loss = values[l.index()].take().expect("loss computed");
        let gs = (loss * w)?.backward()?;
        for (i, p) in model.params.params.iter().enumerate() {
            if let (true, Some(g)) = (p.trainable, gs.get(p.var.as_tensor())) {
                total[i] = Some(match total[i].take() {
                    None => g.clone(),
                    Some(a) => (a + g)?,
                });
            }
        }
    }
    Ok(total)
}
