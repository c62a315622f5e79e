//! Runs a plan's execution order on a [`StepState`]: one forward pass, then per-loss backward
//! passes routed by the reachability groups, freeing each node's activations after its last
//! backward (`exec::step` holds the rules; this file only walks the order).

use candle_core::{Result, Tensor};
use petgraph::graph::NodeIndex;
use tracing::debug_span;

use super::model::Model;
use super::step::{OnGradsFinal, StepInput, StepOutput, StepState};
use crate::graph::{Action, Plan};

/// [`Hooks::after_action`]: called after each action, once what it no longer needs is dropped.
pub type AfterAction<'a> = dyn FnMut(&Action, &StepState<'_>) + 'a;

/// What a caller sees while a step runs. Observers only read: nothing they do changes what
/// the step computes.
#[derive(Default)]
pub struct Hooks<'a> {
    /// After each action, with the step's state (the memory benchmark and tests measure what
    /// it holds: `exec::accounting`).
    pub after_action: Option<&'a mut AfterAction<'a>>,
    /// As soon as a node's gradients are final. The trainer applies the optimizer to the node
    /// here and drops its gradients, so that a GIM or LoCo step never holds more than the
    /// gradients of the units still running: a unit updates as soon as it is done, which is
    /// what local learning allows (and the same update as after the whole step: no later
    /// backward reads the node's weights).
    pub grads_final: Option<&'a mut OnGradsFinal<'a>>,
}

/// One forward and all backward passes of `batch`: the two views stacked (`[2N, C, H, W]`, a
/// `&Tensor`), with their labels where the graph reads them ([`StepInput`]).
pub fn run_step(plan: &Plan, model: &Model, batch: impl Into<StepInput>) -> Result<StepOutput> {
    run_step_with(plan, model, batch, Hooks::default())
}

/// [`run_step`] with [`Hooks`].
pub fn run_step_with(
    plan: &Plan,
    model: &Model,
    batch: impl Into<StepInput>,
    mut hooks: Hooks<'_>,
) -> Result<StepOutput> {
    let batch = batch.into();
    let mut state = StepState::new(plan, model);
    for action in &plan.order.actions {
        match *action {
            Action::Forward(n) => state.forward(n, &batch)?,
            Action::Backward { node, group } => state.backward(node, group, hooks.grads_final.as_deref_mut())?,
        }
        if let Some(after) = hooks.after_action.as_mut() {
            after(action, &state);
        }
    }
    Ok(state.finish())
}

/// Forward only, in eval mode (batch norm uses running statistics): the output of `node`.
///
/// # Shapes
/// `[N, C, H, W]` → `[N, …]` (the node's output).
pub fn forward_to(plan: &Plan, model: &Model, batch: &Tensor, node: NodeIndex) -> Result<Tensor> {
    // The path from input to `node`; every node has one producer.
    let mut path = vec![node];
    while let Some((_, p)) = path.last().and_then(|&n| plan.producer(n)) {
        path.push(p);
    }
    path.reverse();
    let mut x = batch.detach();
    for &n in &path[1..] {
        let _span = debug_span!("eval_forward", node = %plan.id(n)).entered();
        x = model.forward_node(n, &x, false)?.detach();
    }
    Ok(x)
}
