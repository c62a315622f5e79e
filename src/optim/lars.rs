//! LARS as SimCLR uses it (`tf2/lars_optimizer.py`, `classic_momentum=True`).

use candle_core::{DType, Result, Tensor};

use super::in_place::{self, LarsUpdate};
use super::{decayed, updates, Optimizer, Slots};
use crate::nn::params::Param;

fn default_momentum() -> f64 {
    0.9
}
fn default_false() -> bool {
    false
}
fn default_trust_coefficient() -> f64 {
    0.001
}
fn default_weight_decay() -> f64 {
    1e-6
}
fn default_true() -> bool {
    true
}

/// LARS hyper-parameters. Defaults are SimCLR's.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LarsConfig {
    /// Momentum factor.
    #[serde(default = "default_momentum")]
    pub momentum: f64,
    /// Nesterov momentum: step by `momentum * v + scaled_lr * g` instead of `v`.
    #[serde(default = "default_false")]
    pub nesterov: bool,
    /// Trust coefficient η: a parameter's LR is scaled by η·‖w‖/‖g‖.
    #[serde(default = "default_trust_coefficient")]
    pub trust_coefficient: f64,
    /// L2 penalty added to the gradient (`g += weight_decay * w`) before the trust ratio.
    #[serde(default = "default_weight_decay")]
    pub weight_decay: f64,
    /// Exclude biases and BatchNorm parameters from weight decay, and so from the trust ratio
    /// too (SimCLR does; its `exclude_from_layer_adaptation` defaults to the weight-decay
    /// exclusion). The same key as SGD's and AdamW's; `exclude_bias_and_norm`, its former
    /// name, is still read, with a warning.
    #[serde(default = "default_true", alias = "exclude_bias_and_norm")]
    pub exclude_bias_and_norm_from_weight_decay: bool,
}

impl Default for LarsConfig {
    fn default() -> Self {
        Self {
            momentum: default_momentum(),
            nesterov: false,
            trust_coefficient: default_trust_coefficient(),
            weight_decay: default_weight_decay(),
            exclude_bias_and_norm_from_weight_decay: true,
        }
    }
}

impl LarsConfig {
    pub fn validate(&self) -> Vec<String> {
        let mut errors = vec![];
        if !(0.0..1.0).contains(&self.momentum) {
            errors.push(format!("lars: momentum must be in [0, 1), got {}", self.momentum));
        }
        if !(self.trust_coefficient > 0.0 && self.trust_coefficient.is_finite()) {
            errors.push(format!("lars: trust_coefficient must be > 0, got {}", self.trust_coefficient));
        }
        if !(self.weight_decay >= 0.0 && self.weight_decay.is_finite()) {
            errors.push(format!("lars: weight_decay must be >= 0, got {}", self.weight_decay));
        }
        errors
    }
}

/// LARS (You et al. 2017) in SimCLR's form. Per parameter, with `g` its gradient:
/// `g += wd·w` if decayed; `trust = η·‖w‖/‖g‖` if adapted and both norms are > 0, else 1;
/// `v = m·v + lr·trust·g` (v starts at 0); `w −= nesterov ? m·v + lr·trust·g : v`.
///
/// Unlike PyTorch's SGD, the learning rate is inside the momentum buffer (TF's
/// `MomentumOptimizer` convention), so a learning-rate change takes effect gradually.
/// SimCLR's other mode (`classic_momentum=False`, trust ratio on the momentum) is not
/// implemented.
#[derive(Debug, Clone)]
pub struct Lars {
    config: LarsConfig,
    slots: Slots,
}

impl Lars {
    pub fn new(config: LarsConfig) -> Self {
        Self { config, slots: Slots::new(&["momentum"]) }
    }
}

/// ‖t‖₂ of the whole tensor, accumulated in f64.
fn norm(t: &Tensor) -> Result<f64> {
    Ok(t.to_dtype(DType::F64)?.sqr()?.sum_all()?.to_scalar::<f64>()?.sqrt())
}

impl Optimizer for Lars {
    fn step(&mut self, params: &[Param], grads: &[Option<Tensor>], lr: f64) -> Result<()> {
        let c = &self.config;
        for item in updates(params, grads)? {
            let (p, w, mut g) = item?;
            let adapted = decayed(p.kind, c.exclude_bias_and_norm_from_weight_decay);
            // CPU: the same arithmetic in place, without P-sized temporaries (`in_place`).
            let v = self.slots.get("momentum", p)?.cloned();
            if in_place::supported(&[&w, &g]) && v.as_ref().is_none_or(|v| in_place::supported(&[&w, v])) {
                let decay = (adapted && c.weight_decay != 0.0).then_some(c.weight_decay);
                let mut trust = 1.0;
                if adapted {
                    let (w_norm, g_norm) = in_place::norms(&w, &g, decay)?;
                    if w_norm > 0.0 && g_norm > 0.0 {
                        trust = c.trust_coefficient * w_norm / g_norm;
                    }
                }
                let u = LarsUpdate { decay, scale: lr * trust, momentum: c.momentum, nesterov: c.nesterov };
                let v = match v {
                    Some(v) => {
                        v.inplace_op3(&g, &w, &in_place::Momentum(u))?;
                        v
                    }
                    None => {
                        let v = in_place::first_momentum(&w, &g, u)?;
                        self.slots.set("momentum", p, v.clone());
                        v
                    }
                };
                w.inplace_op3(&v, &g, &in_place::Apply(u))?;
                continue;
            }
            if adapted && c.weight_decay != 0.0 {
                g = (g + (&w * c.weight_decay)?)?;
            }
            let mut trust = 1.0;
            if adapted {
                let (w_norm, g_norm) = (norm(&w)?, norm(&g)?);
                if w_norm > 0.0 && g_norm > 0.0 {
                    trust = c.trust_coefficient * w_norm / g_norm;
                }
            }
            let scaled_g = (&g * (lr * trust))?;
            let v = match self.slots.get("momentum", p)? {
                None => scaled_g.clone(),
                Some(v) => ((v * c.momentum)? + &scaled_g)?,
            };
            let update = if c.nesterov { ((&v * c.momentum)? + scaled_g)? } else { v.clone() };
            p.var.set(&(w - update)?)?;
            self.slots.set("momentum", p, v);
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
    use crate::nn::params::ParamKind;
    use candle_core::Device;

    #[test]
    fn matches_simclr_reference() -> Result<()> {
        let mut worst: f64 = 0.0;
        for (config, want) in [
            (LarsConfig::default(), LARS),
            (
                LarsConfig {
                    nesterov: true,
                    trust_coefficient: 0.01,
                    weight_decay: 0.1,
                    exclude_bias_and_norm_from_weight_decay: false,
                    ..LarsConfig::default()
                },
                LARS_NESTEROV_ALL,
            ),
        ] {
            let err = run_and_compare(&mut Lars::new(config.clone()), want)?;
            assert!(err <= 1e-12, "{config:?}: max error {err}");
            worst = worst.max(err);
        }
        eprintln!("lars vs reference: max abs error {worst:.3e}");
        Ok(())
    }

    /// The in-place CPU path (`in_place`) against the composed candle ops, in f32 where
    /// rounding would show: the composed path is taken for a strided gradient, the in-place one
    /// for the same values contiguous. Weights and momentum after three steps agree to the last
    /// bit but for the norms' summation order.
    #[test]
    fn in_place_matches_composed_ops_in_f32() -> Result<()> {
        use crate::nn::params::{Init, ParamBuilder};
        let dev = Device::Cpu;
        let build = || -> Result<Vec<Param>> {
            let b = ParamBuilder::new(7, &dev, DType::F32).pp("fc");
            b.param("weight", (64, 33), ParamKind::Weight, Init::Normal { std: 0.2 })?;
            b.param("bn", (33, 64), ParamKind::Norm, Init::Const(0.5))?;
            Ok(b.store().params)
        };
        for config in [
            LarsConfig::default(),
            LarsConfig {
                nesterov: true,
                weight_decay: 0.1,
                exclude_bias_and_norm_from_weight_decay: false,
                ..LarsConfig::default()
            },
        ] {
            let (composed, fused) = (build()?, build()?);
            let (mut a, mut b) = (Lars::new(config.clone()), Lars::new(config.clone()));
            for t in 0..3 {
                // Gradients stored transposed: `.t()` is the strided view of the values wanted.
                let gw = Tensor::arange(0f32, 64.0 * 33.0, &dev)?.reshape((33, 64))?.affine(1e-3, -1.0)?.sin()?;
                let gw = (gw * (1.0 + t as f64))?;
                let gn = gw.cos()?.t()?;
                let strided = vec![Some(gw.t()?), Some(gn.t()?)];
                assert!(!strided[0].as_ref().is_some_and(|g| g.is_contiguous()));
                let contiguous = vec![Some(gw.t()?.contiguous()?), Some(gn.t()?.contiguous()?)];
                a.step(&composed, &strided, 0.3)?;
                b.step(&fused, &contiguous, 0.3)?;
            }
            let diff = |x: &Tensor, y: &Tensor| -> Result<f32> { x.sub(y)?.abs()?.max_all()?.to_scalar::<f32>() };
            for (p, q) in composed.iter().zip(&fused) {
                let d = diff(p.var.as_tensor(), q.var.as_tensor())?;
                assert!(d <= 1e-7, "{config:?} {}: weights differ by {d}", p.name);
            }
            for ((k, v), (_, u)) in a.state().iter().zip(b.state().iter()) {
                let d = diff(v, u)?;
                assert!(d <= 1e-9, "{config:?} {k}: momentum differs by {d}");
            }
        }
        Ok(())
    }

    #[test]
    fn excluded_kinds_get_plain_momentum_sgd() -> Result<()> {
        // with the defaults a bias and a BatchNorm scale see neither decay nor trust ratio:
        // the first step is exactly w - lr*g
        let params = params()?;
        let mut opt = Lars::new(LarsConfig::default());
        opt.step(&params, &grads(0)?, 0.5)?;
        for (p, (w0, g)) in params[1..].iter().zip([(&B0[..], &GB[0].unwrap_or_default()[..]), (&N0, &GN[0])]) {
            assert!(p.kind != ParamKind::Weight);
            let got = p.var.as_tensor().to_vec1::<f64>()?;
            for ((a, w), g) in got.iter().zip(w0).zip(g) {
                assert!((a - (w - 0.5 * g)).abs() <= 1e-15);
            }
        }
        Ok(())
    }

    #[test]
    fn zero_weight_gets_trust_ratio_one() -> Result<()> {
        // a zero-initialised weight (the last BN's scale in some ResNets, a fresh head) must
        // still move: ‖w‖ = 0 gives trust 1, not 0
        let params = params()?;
        params[0].var.set(&Tensor::zeros((2, 3), DType::F64, &Device::Cpu)?)?;
        let mut opt = Lars::new(LarsConfig { weight_decay: 0.0, ..LarsConfig::default() });
        opt.step(&params, &grads(0)?, 0.1)?;
        let got = params[0].var.as_tensor().flatten_all()?.to_vec1::<f64>()?;
        for (a, g) in got.iter().zip(GW[0]) {
            assert!((a + 0.1 * g).abs() <= 1e-15);
        }
        Ok(())
    }

    #[test]
    fn state_round_trips() -> Result<()> {
        let params = params()?;
        let mut first = Lars::new(LarsConfig::default());
        first.step(&params, &grads(0)?, LRS[0])?;
        first.step(&params, &grads(1)?, LRS[1])?;
        let mut resumed = Lars::new(LarsConfig::default());
        resumed.load_state(&first.state())?;
        resumed.step(&params, &grads(2)?, LRS[2])?;
        assert!(max_error(&params, LARS)? <= 1e-12);
        Ok(())
    }
}
