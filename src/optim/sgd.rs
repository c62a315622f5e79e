//! SGD with momentum, as `torch.optim.SGD` with dampening 0.

use candle_core::{Result, Tensor};

use super::{decayed, updates, Optimizer, Slots};
use crate::nn::params::Param;

fn default_momentum() -> f64 {
    0.0
}
fn default_false() -> bool {
    false
}
fn default_weight_decay() -> f64 {
    0.0
}

/// SGD hyper-parameters. Defaults are PyTorch's, i.e. plain SGD (the linear probe's optimizer).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SgdConfig {
    /// Momentum factor (0 = plain SGD, no state). Dampening is always 0.
    #[serde(default = "default_momentum")]
    pub momentum: f64,
    /// Nesterov momentum: step along `g + momentum * buf` instead of `buf`.
    #[serde(default = "default_false")]
    pub nesterov: bool,
    /// L2 penalty added to the gradient (`g += weight_decay * w`), before momentum, as PyTorch.
    #[serde(default = "default_weight_decay")]
    pub weight_decay: f64,
    /// Apply no weight decay to biases and BatchNorm parameters.
    #[serde(default = "default_false")]
    pub exclude_bias_and_norm_from_weight_decay: bool,
}

impl Default for SgdConfig {
    fn default() -> Self {
        Self {
            momentum: default_momentum(),
            nesterov: false,
            weight_decay: default_weight_decay(),
            exclude_bias_and_norm_from_weight_decay: false,
        }
    }
}

impl SgdConfig {
    pub fn validate(&self) -> Vec<String> {
        let mut errors = vec![];
        if !(0.0..1.0).contains(&self.momentum) {
            errors.push(format!("sgd: momentum must be in [0, 1), got {}", self.momentum));
        }
        if self.nesterov && self.momentum == 0.0 {
            errors.push("sgd: nesterov needs a momentum > 0 (PyTorch refuses it too)".to_string());
        }
        if !(self.weight_decay >= 0.0 && self.weight_decay.is_finite()) {
            errors.push(format!("sgd: weight_decay must be >= 0, got {}", self.weight_decay));
        }
        errors
    }
}

/// SGD with momentum. Per parameter, with `g` its gradient:
/// `d = g + wd·w`; `buf = d` on the first step, else `buf = momentum·buf + d`;
/// `w -= lr · (nesterov ? d + momentum·buf : buf)`.
#[derive(Debug, Clone)]
pub struct Sgd {
    config: SgdConfig,
    slots: Slots,
}

impl Sgd {
    pub fn new(config: SgdConfig) -> Self {
        Self { config, slots: Slots::new(&["momentum"]) }
    }
}

impl Optimizer for Sgd {
    fn step(&mut self, params: &[Param], grads: &[Option<Tensor>], lr: f64) -> Result<()> {
        let c = &self.config;
        for item in updates(params, grads)? {
            let (p, w, g) = item?;
            let mut d = g;
            if c.weight_decay != 0.0 && decayed(p.kind, c.exclude_bias_and_norm_from_weight_decay) {
                d = (d + (&w * c.weight_decay)?)?;
            }
            if c.momentum != 0.0 {
                // PyTorch starts the buffer at the first gradient, not at zero
                let buf = match self.slots.get("momentum", p)? {
                    None => d.clone(),
                    Some(buf) => ((buf * c.momentum)? + &d)?,
                };
                d = if c.nesterov { (d + (&buf * c.momentum)?)? } else { buf.clone() };
                self.slots.set("momentum", p, buf);
            }
            p.var.set(&(w - (d * lr)?)?)?;
        }
        Ok(())
    }

    fn state(&self) -> Vec<(String, Tensor)> {
        self.slots.state()
    }

    fn load_state(&mut self, state: &[(String, Tensor)]) -> Result<()> {
        self.slots.load(state)
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_util::*;
    use super::*;

    fn sgd(momentum: f64, weight_decay: f64, nesterov: bool, exclude: bool) -> Sgd {
        Sgd::new(SgdConfig { momentum, nesterov, weight_decay, exclude_bias_and_norm_from_weight_decay: exclude })
    }

    #[test]
    fn matches_pytorch_reference() -> Result<()> {
        let mut worst: f64 = 0.0;
        for (mut opt, want) in [
            (sgd(0.0, 0.0, false, false), SGD_PLAIN),
            (sgd(0.9, 0.01, false, false), SGD_MOMENTUM_WD),
            (sgd(0.9, 0.01, true, true), SGD_NESTEROV_EXCLUDE),
        ] {
            let err = run_and_compare(&mut opt, want)?;
            assert!(err <= 1e-12, "{:?}: max error {err}", opt.config);
            worst = worst.max(err);
        }
        eprintln!("sgd vs reference: max abs error {worst:.3e}");
        Ok(())
    }

    #[test]
    fn plain_sgd_keeps_no_state_and_momentum_state_round_trips() -> Result<()> {
        let mut plain = sgd(0.0, 0.0, false, false);
        plain.step(&params()?, &grads(0)?, 0.1)?;
        assert!(plain.state().is_empty());

        // two steps, checkpoint, a fresh optimizer resumes: same result as three steps
        let params = params()?;
        let mut first = sgd(0.9, 0.01, true, true);
        first.step(&params, &grads(0)?, LRS[0])?;
        first.step(&params, &grads(1)?, LRS[1])?;
        let state = first.state();
        let keys: Vec<&str> = state.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(keys, ["momentum.fc.bias", "momentum.fc.bn", "momentum.fc.weight"]);
        let mut resumed = sgd(0.9, 0.01, true, true);
        resumed.load_state(&state)?;
        resumed.step(&params, &grads(2)?, LRS[2])?;
        assert!(max_error(&params, SGD_NESTEROV_EXCLUDE)? <= 1e-12);
        Ok(())
    }

    #[test]
    fn none_gradient_leaves_parameter_and_state_untouched() -> Result<()> {
        let params = params()?;
        let mut opt = sgd(0.9, 0.1, false, false);
        opt.step(&params, &grads(0)?, 0.1)?;
        let before = opt.state();
        let bias = params[1].var.as_tensor().to_vec1::<f64>()?;
        opt.step(&params, &[None, None, None], 0.1)?;
        assert_eq!(params[1].var.as_tensor().to_vec1::<f64>()?, bias);
        for ((k1, t1), (k2, t2)) in before.iter().zip(opt.state()) {
            assert_eq!(k1, &k2);
            assert_eq!(t1.flatten_all()?.to_vec1::<f64>()?, t2.flatten_all()?.to_vec1::<f64>()?);
        }
        Ok(())
    }
}
