//! What a running step holds, measured between actions: an observer for
//! [`Hooks::after_action`](super::Hooks). It only reads the step's state, so measuring never
//! changes what is computed.

use std::collections::HashSet;

use super::step::StepState;
use crate::graph::Action;

/// Bytes of the distinct storages among the step's held tensors (a leaf is often the very
/// tensor its producer output): node outputs, link outputs, leaves and cotangents. The
/// intermediates candle's graphs keep inside the links are not visible here; a counting
/// allocator sees them (`malloc::CountingAlloc`).
pub fn held_bytes(state: &StepState<'_>) -> usize {
    let mut seen = HashSet::new();
    state
        .held_tensors()
        .filter(|t| {
            let (s, _) = t.storage_and_layout();
            seen.insert(&*s as *const _ as usize)
        })
        .map(|t| t.elem_count() * t.dtype().size_in_bytes())
        .sum()
}

/// Records [`held_bytes`] after every action of a step.
#[derive(Clone, Debug, Default)]
pub struct HeldMeter {
    pub actions: Vec<(Action, usize)>,
}

impl HeldMeter {
    pub fn observe(&mut self, action: &Action, state: &StepState<'_>) {
        self.actions.push((*action, held_bytes(state)));
    }
    /// The largest value seen (0 before any action).
    pub fn peak(&self) -> usize {
        self.actions.iter().map(|a| a.1).max().unwrap_or(0)
    }
}
