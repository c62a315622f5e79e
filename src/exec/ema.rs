//! Moving-average nodes (`op: ema`, BYOL's target network): after each training step every
//! averaged parameter becomes `m·θ + (1 − m)·θ_of`, `m` the node's momentum at that step
//! (`config::EmaConfig::momentum_at`). A pure function of the weights and the step, so a resumed
//! run averages exactly as an uninterrupted one.

use candle_core::Result;

use super::model::Model;

/// Updates every moving average of `model` after step `step` (0-based) of `total`.
pub fn update(model: &Model, step: u64, total: u64) -> Result<()> {
    for a in &model.averages {
        let m = a.config.momentum_at(step, total);
        for &(mine, of) in &a.params {
            let (p, o) = (&model.params.params[mine].var, &model.params.params[of].var);
            let next = ((p.as_tensor() * m)? + (o.as_tensor() * (1.0 - m))?)?;
            p.set(&next)?;
        }
    }
    Ok(())
}
