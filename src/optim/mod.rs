//! Optimizers and learning-rate schedules.
//!
//! candle's own `SGD` has no momentum and no weight decay, and there is no LARS (candle-notes
//! trap 5), so all three optimizers live here, each matching its reference update exactly:
//! [`Sgd`] and [`AdamW`] follow `torch.optim`, [`Lars`] follows SimCLR's TensorFlow code.
//!
//! The learning rate is an argument of [`Optimizer::step`], not optimizer state: the
//! [`LrSchedule`] owns it, so a checkpoint only needs the step number to resume it.

mod adamw;
mod in_place;
mod lars;
mod schedule;
mod sgd;

use std::collections::BTreeMap;

use candle_core::{bail, Result, Tensor};

use crate::nn::params::{Param, ParamKind};

pub use adamw::{AdamW, AdamWConfig};
pub use lars::{Lars, LarsConfig};
pub use schedule::{scaled_lr, Decay, LrSchedule, ScheduleConfig};
pub use sgd::{Sgd, SgdConfig};

/// An optimizer over named parameters.
pub trait Optimizer: Send {
    /// Updates every parameter in place (`var.set`) with learning rate `lr`.
    ///
    /// `params[i]` gets `grads[i]`; `None` means no gradient this step (a parameter no loss
    /// reached, BatchNorm statistics): it is skipped and its state is left untouched, as
    /// PyTorch does for `p.grad is None`. Non-trainable (frozen) parameters are skipped too.
    ///
    /// # Shapes
    /// - `grads[i]`: `params[i]`'s shape.
    fn step(&mut self, params: &[Param], grads: &[Option<Tensor>], lr: f64) -> Result<()>;

    /// Named state tensors for checkpoints, sorted by key (`"momentum.res3.block0.conv1.weight"`).
    fn state(&self) -> Vec<(String, Tensor)>;

    /// Replaces the whole state with a checkpoint's. Keys must use this optimizer's slot names;
    /// shapes are checked against the parameters at the next [`Optimizer::step`].
    fn load_state(&mut self, state: &[(String, Tensor)]) -> Result<()>;
}

/// Which optimizer to train with, and its hyper-parameters (the learning rate is in the
/// schedule). In YAML: `optimizer: { kind: lars, weight_decay: 1.0e-6 }`.
// Unknown keys are rejected, but serde buffers an internally tagged enum before choosing the
// variant, so an error inside it carries no line number (serde_yaml reports line 1) and a
// `serde_path_to_error` path stops at the key holding the enum (`optimizer`).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum OptimizerConfig {
    /// SGD with momentum (PyTorch semantics); the linear probe uses it without momentum.
    Sgd(SgdConfig),
    /// AdamW (PyTorch semantics: decoupled weight decay).
    Adamw(AdamWConfig),
    /// LARS as in SimCLR (layer-wise trust ratio, momentum, weight decay in the update).
    Lars(LarsConfig),
}

impl Default for OptimizerConfig {
    /// SimCLR's optimizer.
    fn default() -> Self {
        OptimizerConfig::Lars(LarsConfig::default())
    }
}

impl OptimizerConfig {
    /// Tensors of state kept per parameter (what the memory guard counts): AdamW's two moments,
    /// one momentum buffer for SGD and LARS (counted even with momentum 0: an upper bound).
    pub fn state_slots(&self) -> usize {
        match self {
            OptimizerConfig::Adamw(_) => 2,
            OptimizerConfig::Sgd(_) | OptimizerConfig::Lars(_) => 1,
        }
    }

    pub fn build(&self) -> Box<dyn Optimizer> {
        match self {
            OptimizerConfig::Sgd(c) => Box::new(Sgd::new(c.clone())),
            OptimizerConfig::Adamw(c) => Box::new(AdamW::new(c.clone())),
            OptimizerConfig::Lars(c) => Box::new(Lars::new(c.clone())),
        }
    }

    /// Every problem with the values (not only the first), one sentence each, naming the key.
    pub fn validate(&self) -> Vec<String> {
        match self {
            OptimizerConfig::Sgd(c) => c.validate(),
            OptimizerConfig::Adamw(c) => c.validate(),
            OptimizerConfig::Lars(c) => c.validate(),
        }
    }
}

/// Whether weight decay (and LARS adaptation) applies to a parameter of this kind.
fn decayed(kind: ParamKind, exclude_bias_and_norm: bool) -> bool {
    !exclude_bias_and_norm || kind == ParamKind::Weight
}

/// Pairs parameters with their gradients, dropping `None` gradients and frozen parameters,
/// and returns the parameter's value and gradient as tensors outside any graph: candle has no
/// no-grad mode (trap 9), so arithmetic on the `Var` itself would record a graph every step.
fn updates<'a>(
    params: &'a [Param],
    grads: &'a [Option<Tensor>],
) -> Result<impl Iterator<Item = Result<(&'a Param, Tensor, Tensor)>> + 'a> {
    if params.len() != grads.len() {
        bail!("optimizer step: {} parameters but {} gradients", params.len(), grads.len());
    }
    Ok(params.iter().zip(grads).filter(|(p, _)| p.trainable).filter_map(|(p, g)| {
        let g = g.as_ref()?;
        let w = p.var.as_detached_tensor();
        if g.shape() != w.shape() || g.dtype() != w.dtype() {
            return Some(Err(candle_core::Error::Msg(format!(
                "optimizer step: gradient of `{}` is {:?} {:?}, the parameter is {:?} {:?}",
                p.name,
                g.shape(),
                g.dtype(),
                w.shape(),
                w.dtype()
            ))));
        }
        Some(Ok((p, w, g.detach())))
    }))
}

/// Per-parameter state tensors under slot names (`momentum`, `exp_avg`, ...), keyed
/// `"{slot}.{param name}"` so a checkpoint reads like the model's own.
#[derive(Debug, Clone, Default)]
struct Slots {
    names: &'static [&'static str],
    tensors: BTreeMap<String, Tensor>,
}

impl Slots {
    fn new(names: &'static [&'static str]) -> Self {
        Self { names, tensors: BTreeMap::new() }
    }

    /// The state of `param` in `slot`, checked against the parameter's shape (a checkpoint
    /// from another model must not silently broadcast).
    fn get(&self, slot: &str, param: &Param) -> Result<Option<&Tensor>> {
        let key = format!("{slot}.{}", param.name);
        match self.tensors.get(&key) {
            Some(t) if t.shape() != param.var.shape() || t.dtype() != param.var.dtype() => bail!(
                "optimizer state `{key}` is {:?} {:?}, the parameter is {:?} {:?}",
                t.shape(),
                t.dtype(),
                param.var.shape(),
                param.var.dtype()
            ),
            other => Ok(other),
        }
    }

    /// A per-parameter counter stored as a one-element f64 tensor (AdamW's step).
    fn get_count(&self, slot: &str, param: &Param) -> Result<u64> {
        match self.tensors.get(&format!("{slot}.{}", param.name)) {
            None => Ok(0),
            Some(t) => {
                let v = t.flatten_all()?.to_dtype(candle_core::DType::F64)?.to_vec1::<f64>()?;
                match v.as_slice() {
                    [c] if *c >= 0.0 && c.fract() == 0.0 => Ok(*c as u64),
                    _ => bail!("optimizer state `{slot}.{}` is not a step count: {v:?}", param.name),
                }
            }
        }
    }

    fn set_count(&mut self, slot: &str, param: &Param, count: u64) -> Result<()> {
        let t = Tensor::new(&[count as f64], param.var.device())?;
        self.set(slot, param, t);
        Ok(())
    }

    fn set(&mut self, slot: &str, param: &Param, value: Tensor) {
        self.tensors.insert(format!("{slot}.{}", param.name), value);
    }

    fn state(&self) -> Vec<(String, Tensor)> {
        self.tensors.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    }

    fn load(&mut self, state: &[(String, Tensor)]) -> Result<()> {
        let bad: Vec<&str> = state
            .iter()
            .map(|(k, _)| k.as_str())
            .filter(|k| !self.names.iter().any(|s| k.strip_prefix(s).is_some_and(|r| r.starts_with('.'))))
            .collect();
        if !bad.is_empty() {
            bail!("optimizer state: keys {bad:?} do not start with one of {:?}", self.names);
        }
        self.tensors = state.iter().cloned().collect();
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod test_util {
    //! The fixture of the reference script pasted in each optimizer's tests.
    use super::*;
    use crate::nn::params::{Init, ParamBuilder};
    use candle_core::{DType, Device};

    pub const W0: [f64; 6] = [0.5, -0.3, 0.8, -0.1, 0.4, -0.7];
    pub const B0: [f64; 3] = [0.05, -0.02, 0.1];
    pub const N0: [f64; 2] = [1.0, 0.9];
    pub const GW: [[f64; 6]; 3] =
        [[0.1, -0.2, 0.3, 0.05, 0.0, -0.1], [-0.2, 0.1, 0.0, 0.3, -0.1, 0.2], [0.05, 0.05, -0.05, 0.1, 0.2, -0.3]];
    pub const GB: [Option<[f64; 3]>; 3] = [Some([0.01, -0.03, 0.02]), None, Some([0.02, 0.0, -0.01])];
    pub const GN: [[f64; 2]; 3] = [[0.1, -0.1], [0.0, 0.0], [0.2, 0.05]];
    pub const LRS: [f64; 3] = [0.1, 0.05, 0.2];

    // Reference results: the parameters after the three steps above, from this numpy script
    // (torch.optim.SGD and torch.optim.AdamW single-tensor updates, and SimCLR's LARS, in
    // float64; numpy 2.4):
    //
    // ```python
    // # Reference values for src/optim tests: torch.optim.SGD / torch.optim.AdamW (single-tensor
    // # code paths of PyTorch 2.x) and SimCLR's LARS (tf2/lars_optimizer.py, classic momentum),
    // # re-written in numpy float64. Three steps, per-step LRs, bias gets no gradient at step 2.
    // import numpy as np
    //
    // W0 = np.array([[0.5, -0.3, 0.8], [-0.1, 0.4, -0.7]])
    // B0 = np.array([0.05, -0.02, 0.1])
    // N0 = np.array([1.0, 0.9])
    // GW = [np.array([[0.1, -0.2, 0.3], [0.05, 0.0, -0.1]]),
    //       np.array([[-0.2, 0.1, 0.0], [0.3, -0.1, 0.2]]),
    //       np.array([[0.05, 0.05, -0.05], [0.1, 0.2, -0.3]])]
    // GB = [np.array([0.01, -0.03, 0.02]), None, np.array([0.02, 0.0, -0.01])]
    // GN = [np.array([0.1, -0.1]), np.array([0.0, 0.0]), np.array([0.2, 0.05])]
    // LRS = [0.1, 0.05, 0.2]
    // KINDS = ["weight", "bias", "norm"]
    //
    // def run(update):
    //     params = [W0.copy(), B0.copy(), N0.copy()]
    //     state = [{}, {}, {}]
    //     for t in range(3):
    //         for i, g in enumerate([GW[t], GB[t], GN[t]]):
    //             if g is None:
    //                 continue  # torch: p.grad is None -> skipped, state untouched
    //             params[i] = update(params[i], g, state[i], LRS[t], KINDS[i])
    //     return params
    //
    // def sgd(momentum, wd, nesterov, exclude):
    //     def update(p, g, s, lr, kind):
    //         d_p = g
    //         if wd != 0 and not (exclude and kind != "weight"):
    //             d_p = d_p + wd * p
    //         if momentum != 0:
    //             if "buf" not in s:
    //                 s["buf"] = d_p.copy()
    //             else:
    //                 s["buf"] = momentum * s["buf"] + d_p  # dampening 0
    //             d_p = d_p + momentum * s["buf"] if nesterov else s["buf"]
    //         return p - lr * d_p
    //     return update
    //
    // def adamw(b1, b2, eps, wd, exclude):
    //     def update(p, g, s, lr, kind):
    //         s.setdefault("m", np.zeros_like(p)); s.setdefault("v", np.zeros_like(p))
    //         s["step"] = s.get("step", 0) + 1
    //         if not (exclude and kind != "weight"):
    //             p = p * (1 - lr * wd)
    //         s["m"] = b1 * s["m"] + (1 - b1) * g
    //         s["v"] = b2 * s["v"] + (1 - b2) * g * g
    //         bc1 = 1 - b1 ** s["step"]
    //         bc2 = 1 - b2 ** s["step"]
    //         denom = np.sqrt(s["v"]) / np.sqrt(bc2) + eps
    //         return p - (lr / bc1) * (s["m"] / denom)
    //     return update
    //
    // def lars(momentum, eta, wd, nesterov, exclude):
    //     def update(p, g, s, lr, kind):
    //         v = s.get("v", np.zeros_like(p))
    //         skip = exclude and kind != "weight"
    //         if not skip:
    //             g = g + wd * p
    //         trust = 1.0
    //         if not skip:
    //             w_norm, g_norm = np.linalg.norm(p), np.linalg.norm(g)
    //             trust = eta * w_norm / g_norm if (w_norm > 0 and g_norm > 0) else 1.0
    //         scaled_lr = lr * trust
    //         s["v"] = momentum * v + scaled_lr * g
    //         upd = momentum * s["v"] + scaled_lr * g if nesterov else s["v"]
    //         return p - upd
    //     return update
    //
    // CASES = {
    //     "SGD_PLAIN": sgd(0.0, 0.0, False, False),
    //     "SGD_MOMENTUM_WD": sgd(0.9, 0.01, False, False),
    //     "SGD_NESTEROV_EXCLUDE": sgd(0.9, 0.01, True, True),
    //     "ADAMW": adamw(0.9, 0.999, 1e-8, 0.05, False),
    //     "ADAMW_EXCLUDE": adamw(0.8, 0.99, 1e-6, 0.05, True),
    //     "LARS": lars(0.9, 0.001, 1e-6, False, True),
    //     "LARS_NESTEROV_ALL": lars(0.9, 0.01, 0.1, True, False),
    // }
    // for name, update in CASES.items():
    //     w, b, n = run(update)
    //     fmt = lambda a: ", ".join(repr(float(x)) for x in a.ravel())
    //     print(f"const {name}: [&[f64]; 3] = [&[{fmt(w)}], &[{fmt(b)}], &[{fmt(n)}]];")
    // ```
    pub const SGD_PLAIN: [&[f64]; 3] =
        [&[0.49, -0.295, 0.78, -0.14, 0.365, -0.6399999999999999], &[0.045, -0.017, 0.1], &[0.95, 0.9]];
    pub const SGD_MOMENTUM_WD: [&[f64]; 3] = [
        &[0.5016500895, -0.2694848397, 0.7121649292, -0.2035576249, 0.38004447960000004, -0.6501773292999999],
        &[0.0429621, -0.011510040000000003, 0.0959242],
        &[0.921988189, 0.9140205891000001],
    ];
    pub const SGD_NESTEROV_EXCLUDE: [&[f64]; 3] = [
        &[0.4897762739805, -0.2666418763623, 0.6984264503428, -0.23272694880910003, 0.3456175980564, -0.5927531230087],
        &[0.038880000000000005, -0.00944, 0.09676000000000001],
        &[0.88637, 0.9186300000000001],
    ];
    pub const ADAMW: [&[f64]; 3] = [
        &[
            0.4380014513610001,
            -0.1705622631784485,
            0.5729948872904181,
            -0.40268701792895545,
            0.3670124885268088,
            -0.5385325829360594,
        ],
        &[-0.24278368409590545, 0.21331055463784326, -0.053762324737802306],
        &[0.6900793105582608, 1.0517024406352846],
    ];
    pub const ADAMW_EXCLUDE: [&[f64]; 3] = [
        &[
            0.4419044983113409,
            -0.1868166745170847,
            0.5895248471390576,
            -0.40528466465069735,
            0.3559433828508185,
            -0.5327162880944956,
        ],
        &[-0.24644557807449707, 0.2060156277327585, -0.042219735292212186],
        &[0.7013833677688723, 1.049335826937198],
    ];
    pub const LARS: [&[f64]; 3] = [
        &[
            0.49993360537489095,
            -0.29988350811591236,
            0.7997667289074505,
            -0.10019484039071877,
            0.3998945462409523,
            -0.6997669033447964,
        ],
        &[0.0441, -0.0143, 0.09820000000000001],
        &[0.9329, 0.9171],
    ];
    pub const LARS_NESTEROV_ALL: [&[f64]; 3] = [
        &[
            0.49833282928901995,
            -0.2985197077937291,
            0.7959818833344878,
            -0.10264510850992775,
            0.39740791364452016,
            -0.6952287616545745,
        ],
        &[0.04947084442108037, -0.019753412405937604, 0.09980105018076414],
        &[0.9894089361668137, 0.8968537652157973],
    ];

    /// A `[2, 3]` weight, a `[3]` bias and a `[2]` BatchNorm scale, in f64.
    pub fn params() -> Result<Vec<Param>> {
        let b = ParamBuilder::new(0, &Device::Cpu, DType::F64).pp("fc");
        b.param("weight", (2, 3), ParamKind::Weight, Init::Const(0.0))?;
        b.param("bias", 3, ParamKind::Bias, Init::Const(0.0))?;
        b.param("bn", 2, ParamKind::Norm, Init::Const(0.0))?;
        let params = b.store().params;
        params[0].var.set(&Tensor::from_slice(&W0, (2, 3), &Device::Cpu)?)?;
        params[1].var.set(&Tensor::from_slice(&B0, 3, &Device::Cpu)?)?;
        params[2].var.set(&Tensor::from_slice(&N0, 2, &Device::Cpu)?)?;
        Ok(params)
    }

    pub fn grads(t: usize) -> Result<Vec<Option<Tensor>>> {
        let dev = &Device::Cpu;
        Ok(vec![
            Some(Tensor::from_slice(&GW[t], (2, 3), dev)?),
            GB[t].map(|g| Tensor::from_slice(&g, 3, dev)).transpose()?,
            Some(Tensor::from_slice(&GN[t], 2, dev)?),
        ])
    }

    /// Runs the reference's three steps and returns the largest deviation from `want`.
    pub fn run_and_compare(opt: &mut dyn Optimizer, want: [&[f64]; 3]) -> Result<f64> {
        let params = params()?;
        for (t, lr) in LRS.iter().enumerate() {
            opt.step(&params, &grads(t)?, *lr)?;
        }
        max_error(&params, want)
    }

    pub fn max_error(params: &[Param], want: [&[f64]; 3]) -> Result<f64> {
        let mut worst: f64 = 0.0;
        for (p, w) in params.iter().zip(want) {
            let got = p.var.as_tensor().flatten_all()?.to_vec1::<f64>()?;
            assert_eq!(got.len(), w.len());
            worst = got.iter().zip(w).map(|(a, b)| (a - b).abs()).fold(worst, f64::max);
        }
        Ok(worst)
    }
}

#[cfg(test)]
mod tests {
    use super::test_util::*;
    use super::*;

    const YAML_SGD: &str = "kind: sgd\nmomentum: 0.9\nnesterov: true\n";

    #[test]
    fn yaml_picks_the_optimizer_and_fills_defaults() {
        let c: OptimizerConfig = serde_yaml::from_str(YAML_SGD).expect("valid yaml");
        let OptimizerConfig::Sgd(s) = &c else { panic!("expected sgd, got {c:?}") };
        assert_eq!((s.momentum, s.nesterov, s.weight_decay), (0.9, true, 0.0));
        let c: OptimizerConfig = serde_yaml::from_str("kind: lars\n").expect("valid yaml");
        assert_eq!(c, OptimizerConfig::default());
        let c: OptimizerConfig = serde_yaml::from_str("kind: adamw\nbetas: [0.9, 0.95]\n").expect("valid yaml");
        let OptimizerConfig::Adamw(a) = &c else { panic!("expected adamw, got {c:?}") };
        assert_eq!((a.betas, a.eps, a.weight_decay), ([0.9, 0.95], 1e-8, 0.01));
        // what goes into the run directory reads back the same
        let back: OptimizerConfig =
            serde_yaml::from_str(&serde_yaml::to_string(&c).expect("serialises")).expect("reads back");
        assert_eq!(back, c);
    }

    #[test]
    fn yaml_rejects_typos_unknown_kinds_and_wrong_types() {
        for (yaml, needle) in [
            ("kind: sgd\nmomentun: 0.9\n", "momentun"),
            ("kind: adamw\nweight_decay: 0.1\nbeta: [0.9, 0.99]\n", "beta"),
            ("kind: lars\ntrust_coeficient: 0.001\n", "trust_coeficient"),
            // a key of another optimizer is a typo too
            ("kind: sgd\ntrust_coefficient: 0.001\n", "trust_coefficient"),
            ("kind: lamb\n", "lamb"),
            ("momentum: 0.9\n", "kind"),
            ("kind: sgd\nnesterov: yes please\n", "expected a boolean"),
        ] {
            let err = match serde_yaml::from_str::<OptimizerConfig>(yaml) {
                Ok(c) => panic!("accepted {yaml:?} as {c:?}"),
                Err(e) => e.to_string(),
            };
            assert!(err.contains(needle), "error for {yaml:?} does not name `{needle}`: {err}");
        }
    }

    #[test]
    fn validate_lists_every_problem() {
        let c = OptimizerConfig::Lars(LarsConfig {
            momentum: 1.5,
            trust_coefficient: -1.0,
            weight_decay: -1.0,
            ..LarsConfig::default()
        });
        assert_eq!(c.validate().len(), 3, "{:?}", c.validate());
        assert!(OptimizerConfig::default().validate().is_empty());
    }

    #[test]
    fn schema_carries_the_doc_comments_and_defaults() {
        let schema = serde_json::to_string(&schemars::schema_for!(OptimizerConfig)).expect("schema serialises");
        for needle in ["trust_coefficient", "Trust coefficient", "\"default\":0.001", "lars", "nesterov"] {
            assert!(schema.contains(needle), "schema lacks {needle}: {schema}");
        }
    }

    #[test]
    fn mismatched_lengths_and_shapes_are_errors() -> Result<()> {
        let params = params()?;
        let mut opt = OptimizerConfig::default().build();
        assert!(opt.step(&params, &grads(0)?[..2], 0.1).is_err());
        let mut g = grads(0)?;
        g.swap(0, 2);
        assert!(opt.step(&params, &g, 0.1).is_err());
        Ok(())
    }

    #[test]
    fn frozen_parameters_are_not_updated() -> Result<()> {
        let mut params = params()?;
        params[0].trainable = false;
        let mut opt = Sgd::new(SgdConfig { weight_decay: 0.1, ..SgdConfig::default() });
        opt.step(&params, &grads(0)?, 0.1)?;
        let w = params[0].var.as_tensor().flatten_all()?.to_vec1::<f64>()?;
        assert_eq!(w, W0.to_vec());
        Ok(())
    }

    #[test]
    fn load_state_rejects_other_optimizers_slots() -> Result<()> {
        let mut adam = AdamW::new(AdamWConfig::default());
        adam.step(&params()?, &grads(0)?, 0.1)?;
        let mut sgd = Sgd::new(SgdConfig { momentum: 0.9, ..SgdConfig::default() });
        assert!(sgd.load_state(&adam.state()).is_err());
        Ok(())
    }
}
