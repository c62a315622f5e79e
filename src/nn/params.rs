//! Parameter creation with names and seeded initialisation.
//!
//! candle's `VarMap` initialises from an unseeded thread RNG (candle-notes trap 6), so every
//! parameter here is drawn from its own ChaCha stream seeded by `(seed, name)`: the values
//! do not depend on construction order, and adding a decoder leaves the encoder's init alone.
//!
//! Names are dotted paths that start with the YAML node id (`res3.block0.conv1.weight`):
//! the same string is the checkpoint key, the ONNX initializer name and the log field.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Result, Shape, Tensor, Var};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal, Uniform};

use crate::dist::Communicator;

/// What a parameter is, for the optimizers: LARS and weight decay skip `Bias` and `Norm`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ParamKind {
    Weight,
    Bias,
    /// BatchNorm scale and shift.
    Norm,
}

/// How a parameter is initialised.
#[derive(Clone, Copy, Debug)]
pub enum Init {
    Const(f64),
    Normal { std: f64 },
    Uniform { bound: f64 },
}

impl Init {
    /// PyTorch ResNet convolutions: `kaiming_normal_(mode="fan_out", nonlinearity="relu")`.
    pub fn kaiming_fan_out(fan_out: usize) -> Self {
        Init::Normal { std: (2.0 / fan_out as f64).sqrt() }
    }
    /// PyTorch `nn.Linear` default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weight and bias.
    pub fn linear_default(fan_in: usize) -> Self {
        Init::Uniform { bound: 1.0 / (fan_in as f64).sqrt() }
    }
}

/// A learnable tensor with its name and role.
#[derive(Clone, Debug)]
pub struct Param {
    pub name: String,
    pub var: Var,
    pub kind: ParamKind,
    /// False when its node is `frozen`: not given to the optimizer, no weight decay.
    pub trainable: bool,
}

/// A tensor that is state but not learned (BatchNorm running statistics).
#[derive(Clone, Debug)]
pub struct Buffer {
    pub name: String,
    pub var: Var,
}

#[derive(Default, Debug)]
struct Store {
    params: Vec<Param>,
    buffers: Vec<Buffer>,
    names: HashSet<String>,
}

/// All parameters and buffers of a model, in creation order.
#[derive(Clone, Debug, Default)]
pub struct ParamStore {
    pub params: Vec<Param>,
    pub buffers: Vec<Buffer>,
}

impl ParamStore {
    pub fn trainable(&self) -> impl Iterator<Item = &Param> {
        self.params.iter().filter(|p| p.trainable)
    }
    pub fn num_parameters(&self) -> usize {
        self.params.iter().map(|p| p.var.elem_count()).sum()
    }
    /// Every named tensor (parameters then buffers): what a checkpoint holds.
    pub fn named_tensors(&self) -> Vec<(String, Tensor)> {
        let p = self.params.iter().map(|p| (p.name.clone(), p.var.as_tensor().clone()));
        let b = self.buffers.iter().map(|b| (b.name.clone(), b.var.as_tensor().clone()));
        p.chain(b).collect()
    }
}

/// Creates parameters under a path, like candle's `VarBuilder`, but seeded.
#[derive(Clone, Debug)]
pub struct ParamBuilder {
    store: Arc<Mutex<Store>>,
    path: Vec<String>,
    seed: u64,
    trainable: bool,
    device: Device,
    dtype: DType,
    /// The ranks whose batch shares the batch norms built here normalise together.
    batch_norm_group: Option<Arc<dyn Communicator>>,
}

/// FNV-1a: a stable hash (std's `DefaultHasher` may change between Rust releases).
fn fnv1a(s: &str) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in s.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    h
}

impl ParamBuilder {
    pub fn new(seed: u64, device: &Device, dtype: DType) -> Self {
        Self {
            store: Arc::new(Mutex::new(Store::default())),
            path: vec![],
            seed,
            trainable: true,
            device: device.clone(),
            dtype,
            batch_norm_group: None,
        }
    }

    /// The same builder, whose batch norms compute their training statistics over the batch that
    /// all ranks of `group` hold shares of (synchronised batch norm; a group of one changes
    /// nothing).
    pub fn sync_batch_norm(&self, group: Arc<dyn Communicator>) -> Self {
        let mut b = self.clone();
        b.batch_norm_group = (group.size() > 1).then_some(group);
        b
    }

    /// The group set by [`Self::sync_batch_norm`], if any.
    pub fn batch_norm_group(&self) -> Option<&Arc<dyn Communicator>> {
        self.batch_norm_group.as_ref()
    }

    /// A builder for the sub-path `name`.
    pub fn pp(&self, name: impl ToString) -> Self {
        let mut b = self.clone();
        b.path.push(name.to_string());
        b
    }

    /// The same builder, creating frozen parameters when `frozen`.
    pub fn frozen(&self, frozen: bool) -> Self {
        let mut b = self.clone();
        b.trainable = !frozen;
        b
    }

    pub fn is_trainable(&self) -> bool {
        self.trainable
    }
    pub fn device(&self) -> &Device {
        &self.device
    }
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The full dotted name of `name` under this builder's path.
    pub fn name(&self, name: &str) -> String {
        let mut parts = self.path.clone();
        parts.push(name.to_string());
        parts.join(".")
    }

    fn claim(&self, full: &str) -> Result<()> {
        let mut store = self.store.lock().expect("param store poisoned");
        if !store.names.insert(full.to_string()) {
            candle_core::bail!("parameter `{full}` is created twice");
        }
        Ok(())
    }

    fn sample(&self, full: &str, shape: &Shape, init: Init) -> Result<Tensor> {
        let n = shape.elem_count();
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed ^ fnv1a(full));
        let values: Vec<f64> = match init {
            Init::Const(c) => vec![c; n],
            Init::Normal { std } => {
                let d = Normal::new(0.0, std).map_err(|e| candle_core::Error::Msg(e.to_string()))?;
                (0..n).map(|_| d.sample(&mut rng)).collect()
            }
            Init::Uniform { bound } => {
                let d = Uniform::new_inclusive(-bound, bound);
                (0..n).map(|_| d.sample(&mut rng)).collect()
            }
        };
        Tensor::from_vec(values, shape.clone(), &self.device)?.to_dtype(self.dtype)
    }

    /// Creates a parameter. Returns a tensor that records gradients when the parameter is
    /// trainable, and a detached one (no graph, no gradient) when frozen; both share storage
    /// with the stored `Var`, so loading a checkpoint later updates them in place.
    pub fn param(&self, name: &str, shape: impl Into<Shape>, kind: ParamKind, init: Init) -> Result<Tensor> {
        let full = self.name(name);
        self.claim(&full)?;
        let var = Var::from_tensor(&self.sample(&full, &shape.into(), init)?)?;
        let t = if self.trainable { var.as_tensor().clone() } else { var.as_detached_tensor() };
        let mut store = self.store.lock().expect("param store poisoned");
        store.params.push(Param { name: full, var, kind, trainable: self.trainable });
        Ok(t)
    }

    /// Creates a buffer (state updated by the module itself, never by an optimizer).
    pub fn buffer(&self, name: &str, shape: impl Into<Shape>, value: f64) -> Result<Var> {
        let full = self.name(name);
        self.claim(&full)?;
        let var = Var::from_tensor(&self.sample(&full, &shape.into(), Init::Const(value))?)?;
        let mut store = self.store.lock().expect("param store poisoned");
        store.buffers.push(Buffer { name: full, var: var.clone() });
        Ok(var)
    }

    /// Everything created so far (by this builder and all its clones).
    pub fn store(&self) -> ParamStore {
        let store = self.store.lock().expect("param store poisoned");
        ParamStore { params: store.params.clone(), buffers: store.buffers.clone() }
    }
}

impl ParamStore {
    /// Writes every parameter and buffer as safetensors; keys are the dotted names.
    pub fn save_safetensors(&self, path: &std::path::Path) -> Result<()> {
        let map: std::collections::HashMap<String, Tensor> = self.named_tensors().into_iter().collect();
        candle_core::safetensors::save(&map, path)
    }

    /// Loads values saved by [`Self::save_safetensors`] into the existing variables.
    /// Refuses a file that does not match (missing, unexpected or misshapen keys), listing them.
    pub fn load_safetensors(&self, path: &std::path::Path) -> Result<()> {
        // candle reads the file whole: a regular file of a bounded size first.
        crate::bounded::open(path, crate::bounded::MODEL)
            .map_err(|e| candle_core::Error::Msg(format!("{}: cannot read weights: {e}", path.display())))?;
        let loaded = candle_core::safetensors::load(path, &Device::Cpu)
            .map_err(|e| candle_core::Error::Msg(format!("{}: cannot read weights: {e}", path.display())))?;
        let mut problems = vec![];
        let targets: Vec<(&String, &Var)> = self
            .params
            .iter()
            .map(|p| (&p.name, &p.var))
            .chain(self.buffers.iter().map(|b| (&b.name, &b.var)))
            .collect();
        for (name, var) in &targets {
            match loaded.get(*name) {
                None => problems.push(format!("missing `{name}`")),
                Some(t) if t.dims() != var.dims() => problems.push(format!(
                    "`{name}` has shape {:?} in the file, the graph needs {:?}",
                    t.dims(),
                    var.dims()
                )),
                Some(_) => {}
            }
        }
        for k in loaded.keys() {
            if !targets.iter().any(|(n, _)| *n == k) {
                problems.push(format!("unexpected `{k}`"));
            }
        }
        if !problems.is_empty() {
            problems.sort();
            candle_core::bail!("{}: the weights do not match the graph:\n  {}", path.display(), problems.join("\n  "));
        }
        for (name, var) in targets {
            let t = &loaded[name.as_str()];
            var.set(&t.to_device(var.device())?.to_dtype(var.dtype())?)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_depends_on_seed_and_name_not_order() -> Result<()> {
        let a = ParamBuilder::new(7, &Device::Cpu, DType::F32);
        let x1 = a.pp("res2").param("w", (4, 4), ParamKind::Weight, Init::Normal { std: 1.0 })?;
        let b = ParamBuilder::new(7, &Device::Cpu, DType::F32);
        b.pp("other").param("w", (4, 4), ParamKind::Weight, Init::Normal { std: 1.0 })?;
        let x2 = b.pp("res2").param("w", (4, 4), ParamKind::Weight, Init::Normal { std: 1.0 })?;
        let d = (x1 - &x2)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert_eq!(d, 0.0);
        let c = ParamBuilder::new(8, &Device::Cpu, DType::F32);
        let x3 = c.pp("res2").param("w", (4, 4), ParamKind::Weight, Init::Normal { std: 1.0 })?;
        assert!((x2 - x3)?.abs()?.max_all()?.to_scalar::<f32>()? > 0.0);
        Ok(())
    }

    #[test]
    fn duplicate_names_are_refused_and_frozen_params_are_detached() -> Result<()> {
        let a = ParamBuilder::new(0, &Device::Cpu, DType::F32);
        a.param("w", 3, ParamKind::Weight, Init::Const(1.0))?;
        assert!(a.param("w", 3, ParamKind::Weight, Init::Const(1.0)).is_err());
        let f = a.pp("frozen").frozen(true).param("w", 3, ParamKind::Weight, Init::Const(2.0))?;
        assert!(!f.track_op());
        let store = a.store();
        assert_eq!(store.trainable().count(), 1);
        assert_eq!(store.params.len(), 2);
        Ok(())
    }
}
