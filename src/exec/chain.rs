//! A node's forward as a chain of links (a stage: one per residual block), each with its own
//! candle graph, so that the node's last backward can free a block's activations as soon as
//! that block is done instead of when the whole stage is. Without this, the backward of a
//! stage holds all of the stage's saved activations plus the gradients candle computes on the
//! way: the peak of a GIM or LoCo step (docs/performance.md, "Memory").
//!
//! Two details keep the cut free in memory:
//! - a block ends in `relu(z)`. The engine computes that ReLU itself, straight into a `Var`
//!   built from the output vector (zero copy), which is then both the block's output and the
//!   next link's leaf. The backward seeds at `z` with `g ⊙ [relu(z) > 0]`. candle's own ReLU
//!   would keep `z` and its output too; a `Var::from_tensor` leaf would copy the output again.
//! - the backward is seeded by [`Cotangent`], a custom op whose gradient *is* the cotangent,
//!   instead of `(out · g).sum()`, whose backward materialises two more tensors of `out`'s size.

use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Result, Shape, Tensor, Var, WithDType};
use rayon::prelude::*;

use super::model::Piece;
use crate::nn::cpu_slice::with_slice;

/// One link of a node's chain, alive until the node's last backward has passed it.
#[derive(Debug)]
pub struct Link {
    /// Where the link reads its input: `None` for the first link (the engine's edge leaf).
    pub input: Option<Var>,
    /// Where its backward is seeded: the pre-activation of a rectified link, else the output.
    seed: Tensor,
    /// The link's output (for a rectified link, a leaf holding `relu(seed)`).
    pub output: Tensor,
    rectified: bool,
}

impl Link {
    /// The link made of one forward piece read from `input`.
    pub fn new(input: Option<Var>, piece: Piece) -> Result<Self> {
        Ok(match piece {
            Piece::Plain(t) => Link { input, seed: t.clone(), output: t, rectified: false },
            Piece::Rectified(z) => {
                let output = rectified_leaf(&z)?.as_tensor().clone();
                Link { input, seed: z, output, rectified: true }
            }
        })
    }

    /// Backward of the link with cotangent `g` at its output: the gradients of its parameters
    /// and its input leaf.
    pub fn backward(&self, g: &Tensor) -> Result<candle_core::backprop::GradStore> {
        let g = g.detach();
        let g = if self.rectified { relu_backward(&self.output, &g)? } else { g };
        seed_backward(&self.seed, g)
    }

    /// Bytes of the link's output (its other activations live in candle's graph).
    pub fn output_bytes(&self) -> usize {
        self.output.elem_count() * self.output.dtype().size_in_bytes()
    }
}

/// `relu(z)` as a new leaf, written into a vector the leaf then owns (on CPU).
fn rectified_leaf(z: &Tensor) -> Result<Var> {
    fn relu<T: WithDType + Send + Sync>(z: &Tensor) -> Result<Vec<T>> {
        with_slice(z, |s: &[T]| s.par_iter().map(|&v| if v > T::zero() { v } else { T::zero() }).collect())
    }
    match (z.device(), z.dtype()) {
        (Device::Cpu, DType::F32) => Var::from_vec(relu::<f32>(z)?, z.shape(), z.device()),
        (Device::Cpu, DType::F64) => Var::from_vec(relu::<f64>(z)?, z.shape(), z.device()),
        (Device::Cpu, DType::F16) => Var::from_vec(relu::<half::f16>(z)?, z.shape(), z.device()),
        (Device::Cpu, DType::BF16) => Var::from_vec(relu::<half::bf16>(z)?, z.shape(), z.device()),
        // Elsewhere a copy of candle's ReLU (device memory is not what is measured here).
        _ => Var::from_tensor(&z.detach().relu()?),
    }
}

/// `g ⊙ [y > 0]` for `y = relu(z)`: one pass on CPU.
fn relu_backward(y: &Tensor, g: &Tensor) -> Result<Tensor> {
    fn mask<T: WithDType + Send + Sync>(y: &Tensor, g: &Tensor) -> Result<Tensor> {
        let v = with_slice(y, |ys: &[T]| {
            with_slice(g, |gs: &[T]| {
                ys.par_iter().zip(gs).map(|(&y, &g)| if y > T::zero() { g } else { T::zero() }).collect::<Vec<T>>()
            })
        })??;
        Tensor::from_vec(v, y.shape(), y.device())
    }
    match (y.device(), y.dtype()) {
        (Device::Cpu, DType::F32) if g.dtype() == DType::F32 => mask::<f32>(y, g),
        (Device::Cpu, DType::F64) if g.dtype() == DType::F64 => mask::<f64>(y, g),
        _ => g.mul(&y.gt(0.0)?.to_dtype(g.dtype())?),
    }
}

/// `backward()` from `t` with cotangent `g` (same shape).
pub fn seed_backward(t: &Tensor, g: Tensor) -> Result<candle_core::backprop::GradStore> {
    if t.device().is_cpu() {
        t.apply_op1(Cotangent(std::sync::Mutex::new(Some(g))))?.backward()
    } else {
        t.mul(&g)?.sum_all()?.backward()
    }
}

/// A scalar whose gradient with respect to its argument is the given cotangent. Only ever the
/// root of one backward (where candle seeds a gradient of one), so `bwd` ignores `grad_res` and
/// hands the cotangent over instead of keeping a second reference alive through the backward.
struct Cotangent(std::sync::Mutex<Option<Tensor>>);

impl CustomOp1 for Cotangent {
    fn name(&self) -> &'static str {
        "cotangent"
    }

    fn cpu_fwd(&self, _s: &CpuStorage, _l: &Layout) -> Result<(CpuStorage, Shape)> {
        // The value is never read: only the graph matters.
        Ok((CpuStorage::F32(vec![0.0]), Shape::from(())))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, _grad_res: &Tensor) -> Result<Option<Tensor>> {
        let mut g = self.0.lock().map_err(|_| candle_core::Error::Msg("cotangent lock poisoned".into()))?;
        g.take().map(Some).ok_or_else(|| candle_core::Error::Msg("cotangent seeded twice".into()))
    }
}
