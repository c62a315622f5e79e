//! AdamW, as `torch.optim.AdamW` (no amsgrad).

use candle_core::{Result, Tensor};

use super::{decayed, in_place, updates, Optimizer, Slots};
use crate::nn::params::Param;

fn default_betas() -> [f64; 2] {
    [0.9, 0.999]
}
fn default_eps() -> f64 {
    1e-8
}
fn default_weight_decay() -> f64 {
    0.01
}
fn default_false() -> bool {
    false
}

/// AdamW hyper-parameters. Defaults are PyTorch's.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AdamWConfig {
    /// Decay rates of the first and second moment estimates.
    #[serde(default = "default_betas")]
    pub betas: [f64; 2],
    /// Added to the bias-corrected √v (outside the square root), for numerical stability.
    #[serde(default = "default_eps")]
    pub eps: f64,
    /// Decoupled weight decay: `w *= 1 - lr * weight_decay` before the Adam step.
    #[serde(default = "default_weight_decay")]
    pub weight_decay: f64,
    /// Apply no weight decay to biases and BatchNorm parameters.
    #[serde(default = "default_false")]
    pub exclude_bias_and_norm_from_weight_decay: bool,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            betas: default_betas(),
            eps: default_eps(),
            weight_decay: default_weight_decay(),
            exclude_bias_and_norm_from_weight_decay: false,
        }
    }
}

impl AdamWConfig {
    pub fn validate(&self) -> Vec<String> {
        let mut errors = vec![];
        for (i, b) in self.betas.iter().enumerate() {
            if !(0.0..1.0).contains(b) {
                errors.push(format!("adamw: betas[{i}] must be in [0, 1), got {b}"));
            }
        }
        if !(self.eps > 0.0 && self.eps.is_finite()) {
            errors.push(format!("adamw: eps must be > 0, got {}", self.eps));
        }
        if !(self.weight_decay >= 0.0 && self.weight_decay.is_finite()) {
            errors.push(format!("adamw: weight_decay must be >= 0, got {}", self.weight_decay));
        }
        errors
    }
}

/// AdamW. Per parameter, at its own step count `t` (parameters skipped with a `None` gradient
/// do not advance it): `w *= 1 − lr·wd`; `m = β1·m + (1−β1)·g`; `v = β2·v + (1−β2)·g²`;
/// `w −= lr/(1−β1ᵗ) · m / (√v/√(1−β2ᵗ) + eps)`.
#[derive(Debug, Clone)]
pub struct AdamW {
    config: AdamWConfig,
    slots: Slots,
}

impl AdamW {
    pub fn new(config: AdamWConfig) -> Self {
        Self { config, slots: Slots::new(&["exp_avg", "exp_avg_sq", "step"]) }
    }
}

impl Optimizer for AdamW {
    fn step(&mut self, params: &[Param], grads: &[Option<Tensor>], lr: f64) -> Result<()> {
        let c = &self.config;
        let [b1, b2] = c.betas;
        for item in updates(params, grads)? {
            let (p, mut w, g) = item?;
            let t = self.slots.get_count("step", p)? + 1;
            let decays = c.weight_decay != 0.0 && decayed(p.kind, c.exclude_bias_and_norm_from_weight_decay);
            let step_size = lr / (1.0 - b1.powf(t as f64));
            let bias_correction2_sqrt = (1.0 - b2.powf(t as f64)).sqrt();
            // CPU, after the first step: the same arithmetic in three parallel passes, in place
            // (`in_place`).
            let (m, v) = (self.slots.get("exp_avg", p)?.cloned(), self.slots.get("exp_avg_sq", p)?.cloned());
            if let (Some(m), Some(v)) = (&m, &v) {
                if in_place::supported(&[&w, &g, m, v]) {
                    m.inplace_op2(&g, &in_place::Moment { beta: b1, square: false })?;
                    v.inplace_op2(&g, &in_place::Moment { beta: b2, square: true })?;
                    let apply = in_place::AdamApply {
                        decay: decays.then_some(1.0 - lr * c.weight_decay),
                        inv_bc2: 1.0 / bias_correction2_sqrt,
                        eps: c.eps,
                        step_size,
                    };
                    w.inplace_op3(m, v, &apply)?;
                    self.slots.set_count("step", p, t)?;
                    continue;
                }
            }
            if decays {
                w = (w * (1.0 - lr * c.weight_decay))?;
            }
            let m = match m {
                None => (&g * (1.0 - b1))?,
                Some(m) => ((m * b1)? + (&g * (1.0 - b1))?)?,
            };
            let v = match v {
                None => (g.sqr()? * (1.0 - b2))?,
                Some(v) => ((v * b2)? + (g.sqr()? * (1.0 - b2))?)?,
            };
            let denom = ((v.sqrt()? / bias_correction2_sqrt)? + c.eps)?;
            p.var.set(&(w - ((&m / &denom)? * step_size)?)?)?;
            self.slots.set("exp_avg", p, m);
            self.slots.set("exp_avg_sq", p, v);
            self.slots.set_count("step", p, t)?;
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

    #[test]
    fn matches_pytorch_reference() -> Result<()> {
        let mut worst: f64 = 0.0;
        for (config, want) in [
            (AdamWConfig { weight_decay: 0.05, ..AdamWConfig::default() }, ADAMW),
            (
                AdamWConfig {
                    betas: [0.8, 0.99],
                    eps: 1e-6,
                    weight_decay: 0.05,
                    exclude_bias_and_norm_from_weight_decay: true,
                },
                ADAMW_EXCLUDE,
            ),
        ] {
            let err = run_and_compare(&mut AdamW::new(config.clone()), want)?;
            assert!(err <= 1e-12, "{config:?}: max error {err}");
            worst = worst.max(err);
        }
        eprintln!("adamw vs reference: max abs error {worst:.3e}");
        Ok(())
    }

    #[test]
    fn state_round_trips_with_per_parameter_step_counts() -> Result<()> {
        let config = AdamWConfig { weight_decay: 0.05, ..AdamWConfig::default() };
        let params = params()?;
        let mut first = AdamW::new(config.clone());
        first.step(&params, &grads(0)?, LRS[0])?;
        first.step(&params, &grads(1)?, LRS[1])?;
        let state = first.state();
        // the bias had no gradient at step 2, so it has taken one step, the others two
        let step = |name: &str| -> Result<f64> {
            match state.iter().find(|(k, _)| k == name) {
                Some((_, t)) => t.to_vec1::<f64>().map(|v| v[0]),
                None => candle_core::bail!("no {name} in the state"),
            }
        };
        assert_eq!((step("step.fc.bias")?, step("step.fc.weight")?), (1.0, 2.0));
        let mut resumed = AdamW::new(config);
        resumed.load_state(&state)?;
        resumed.step(&params, &grads(2)?, LRS[2])?;
        assert!(max_error(&params, ADAMW)? <= 1e-12);
        Ok(())
    }

    #[test]
    fn f32_parameters_stay_close_to_the_f64_reference() -> Result<()> {
        let params64 = params()?;
        let params: Vec<Param> = params64
            .iter()
            .map(|p| -> Result<Param> {
                let var = candle_core::Var::from_tensor(&p.var.as_tensor().to_dtype(candle_core::DType::F32)?)?;
                Ok(Param { var, ..p.clone() })
            })
            .collect::<Result<_>>()?;
        let mut opt = AdamW::new(AdamWConfig { weight_decay: 0.05, ..AdamWConfig::default() });
        for (t, lr) in LRS.iter().enumerate() {
            let g: Vec<Option<Tensor>> = grads(t)?
                .into_iter()
                .map(|g| g.map(|g| g.to_dtype(candle_core::DType::F32)).transpose())
                .collect::<Result<_>>()?;
            opt.step(&params, &g, *lr)?;
        }
        let mut worst: f64 = 0.0;
        for (p, want) in params.iter().zip(ADAMW) {
            let got = p.var.as_tensor().flatten_all()?.to_vec1::<f32>()?;
            worst = got.iter().zip(want).map(|(a, b)| (*a as f64 - b).abs()).fold(worst, f64::max);
        }
        eprintln!("adamw f32 vs f64 reference: max abs error {worst:.3e}");
        assert!(worst <= 1e-6, "{worst}");
        Ok(())
    }

    /// The in-place CPU path (`in_place`) against the composed candle ops, bit for bit in f32:
    /// the composed path is taken for a strided gradient, the in-place one for the same values
    /// contiguous. Weights and both moments after four steps, with decay on one parameter and
    /// not the other, and a weight larger than one parallel task.
    #[test]
    fn in_place_equals_composed_ops_in_f32() -> Result<()> {
        use crate::nn::params::{Init, ParamBuilder, ParamKind};
        use candle_core::{DType, Device};
        let dev = Device::Cpu;
        let build = || -> Result<Vec<Param>> {
            let b = ParamBuilder::new(7, &dev, DType::F32).pp("fc");
            b.param("weight", (640, 33), ParamKind::Weight, Init::Normal { std: 0.2 })?;
            b.param("bn", (33, 64), ParamKind::Norm, Init::Const(0.5))?;
            Ok(b.store().params)
        };
        let config =
            AdamWConfig { weight_decay: 0.05, exclude_bias_and_norm_from_weight_decay: true, ..Default::default() };
        let (composed, fused) = (build()?, build()?);
        let (mut a, mut b) = (AdamW::new(config.clone()), AdamW::new(config));
        for t in 0..4 {
            // Gradients stored transposed: `.t()` is the strided view of the values wanted.
            let gw = Tensor::arange(0f32, 640.0 * 33.0, &dev)?.reshape((33, 640))?.affine(1e-3, -1.0)?.sin()?;
            let gw = (gw * (1.0 + t as f64))?;
            let gn = gw.narrow(1, 0, 64)?.cos()?;
            let strided = vec![Some(gw.t()?), Some(gn.t()?.contiguous()?.t()?)];
            assert!(strided.iter().all(|g| !g.as_ref().is_some_and(|g| g.is_contiguous())));
            let contiguous = vec![Some(gw.t()?.contiguous()?), Some(gn)];
            a.step(&composed, &strided, 0.3)?;
            b.step(&fused, &contiguous, 0.3)?;
        }
        let bits = |t: &Tensor| -> Result<Vec<u32>> {
            Ok(t.flatten_all()?.to_vec1::<f32>()?.into_iter().map(f32::to_bits).collect())
        };
        for (p, q) in composed.iter().zip(&fused) {
            assert!(bits(p.var.as_tensor())? == bits(q.var.as_tensor())?, "{}: weights differ", p.name);
        }
        for ((k, v), (_, u)) in a.state().iter().zip(b.state().iter()) {
            if v.dtype() == DType::F32 {
                assert!(bits(v)? == bits(u)?, "{k} differs");
            }
        }
        Ok(())
    }
}
