//! A link: one piece of a layer's training forward with its own candle graph (a stage has one
//! per residual block, see [`super::Layer`]), so that the engine's last backward through the
//! layer can free a block's activations as soon as that block is done instead of when the
//! whole stage is. Without this, the backward of a stage holds all of the stage's saved
//! activations plus the gradients candle computes on the way: the peak of a GIM or LoCo step
//! (docs/performance.md, "Memory").
//!
//! Three details keep the cut free in memory:
//! - a block ends in `relu(branch + shortcut)`. The link computes that sum and ReLU itself, in
//!   one pass straight into a `Var` built from the output vector (zero copy), which is then both
//!   the block's output and the next link's leaf. candle's add and ReLU would keep the sum and
//!   the output; a `Var::from_tensor` leaf would copy the output once more.
//! - the backward is seeded at `branch` and `shortcut` with `g ⊙ [out > 0]` (the ReLU's mask
//!   read back from the output), by [`Cotangent`]: a custom op whose gradient *is* the
//!   cotangent, instead of `(out · g).sum()`, whose backward materialises two more tensors of
//!   `out`'s size.
//! - a link's backward takes its cotangent by value, so it is freed once the mask is applied.

use std::mem::MaybeUninit;
use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Device, Layout, Result, Shape, Tensor, Var};
use rayon::prelude::*;

use super::act::Act;
use super::batch_norm_op::{tail_forward, BatchNormTrain, TailSeed, SPAN};
use super::shuffle::{deinterleave, interleave};
use crate::cpu_slice::{
    activation_from_vec, leaf_from_vec, unwritten, with_activation, with_activation_in, written, Order,
};
use crate::simd;

/// One link of a layer's chain, alive until the engine's last backward through the layer has
/// passed it.
#[derive(Debug)]
pub struct Link {
    /// Where the link reads its input: `None` for the first link (the engine's edge leaf).
    pub input: Option<Var>,
    /// Where its backward is seeded: the output of a plain link; `branch` and `shortcut` of a
    /// residual one.
    seeds: Seeds,
    /// The link's output (for a residual link, a leaf holding `relu(branch + shortcut)`).
    pub output: Tensor,
}

#[derive(Debug)]
enum Seeds {
    Output,
    Residual {
        branch: Tensor,
        shortcut: Tensor,
    },
    /// A shuffle unit: the output interleaves the channels of `first` and `second`
    /// ([`super::shuffle::interleave`]), each seeded with its share of the cotangent.
    Interleaved {
        first: Tensor,
        second: Tensor,
    },
    /// A block tail: `anchor` is [`TailSeed`] applied to `(z, γ, β)`; its backward reads the
    /// branch's cotangent from `slot`.
    Tail {
        anchor: Tensor,
        slot: Arc<Mutex<Option<Tensor>>>,
        shortcut: Tensor,
    },
}

impl Link {
    /// A link whose output is `output` itself (any layer's whole forward).
    pub fn plain(input: Option<Var>, output: Tensor) -> Self {
        Link { input, seeds: Seeds::Output, output }
    }

    /// A residual block's link: the output `relu(branch + shortcut)`, written into a new leaf.
    pub fn residual(input: Option<Var>, branch: Tensor, shortcut: Tensor) -> Result<Self> {
        let output = rectified_sum(&branch, &shortcut)?.as_tensor().clone();
        Ok(Link { input, seeds: Seeds::Residual { branch, shortcut }, output })
    }

    /// A residual block whose branch ends in a training-mode batch norm `op` on `z`: the output
    /// `relu(op(z; γ, β) + shortcut)` in one pass, written into a new leaf; the branch is never
    /// stored (its backward reads the cotangent the link hands it).
    pub fn tail(
        input: Option<Var>,
        z: &Tensor,
        op: BatchNormTrain,
        gamma: &Tensor,
        beta: &Tensor,
        shortcut: Tensor,
    ) -> Result<Self> {
        let op = op.for_input(z);
        let output = tail_forward(&op, z, gamma, beta, &shortcut)?.as_tensor().clone();
        let slot = Arc::new(Mutex::new(None));
        let anchor = z.apply_op3(gamma, beta, TailSeed { op, slot: slot.clone() })?;
        Ok(Link { input, seeds: Seeds::Tail { anchor, slot, shortcut }, output })
    }

    /// A shuffle unit's link: the output interleaves the channels of its two halves, written
    /// into a new leaf (no concatenated copy is kept; the cotangent is split back).
    pub fn interleaved(input: Option<Var>, first: Tensor, second: Tensor) -> Result<Self> {
        let output = interleave(&first, &second)?.as_tensor().clone();
        Ok(Link { input, seeds: Seeds::Interleaved { first, second }, output })
    }

    /// Backward of the link with cotangent `g` at its output: the gradients of its parameters
    /// and its input leaf. The link's graph stays alive for another backward (a LoCo stage
    /// shared by two units); the last one should be [`Link::last_backward`].
    pub fn backward(&self, g: Tensor) -> Result<candle_core::backprop::GradStore> {
        root(&self.output, &self.seeds, g)?.backward()
    }

    /// The link's last backward: it gives its graph up to candle's walk, which drops each
    /// node once that node's own backward has run, so a saved activation is freed as soon as
    /// the op reading it is done instead of when the whole block is (a block's activations
    /// plus every gradient computed inside it: the peak of a GIM or LoCo step). Returns the
    /// gradients and the input leaf, whose gradient the caller reads.
    pub fn last_backward(self, g: Tensor) -> Result<(candle_core::backprop::GradStore, Option<Var>)> {
        let Link { input, seeds, output } = self;
        let root = root(&output, &seeds, g)?;
        // Only the root may hold the graph now; the output's storage stays with the caller's
        // copies (a leaf or a value still to be read by a consumer).
        drop((seeds, output));
        Ok((root.backward_owned()?, input))
    }

    /// Bytes of the link's output (its other activations live in candle's graph).
    pub fn output_bytes(&self) -> usize {
        self.output.elem_count() * self.output.dtype().size_in_bytes()
    }
}

/// The scalar whose backward is the link's backward with cotangent `g` at `output`.
fn root(output: &Tensor, seeds: &Seeds, g: Tensor) -> Result<Tensor> {
    let g = g.detach();
    match seeds {
        Seeds::Output => seed_root(output, g),
        Seeds::Residual { branch, shortcut } => {
            let g = relu_backward(output, g)?;
            if branch.device().is_cpu() {
                branch.apply_op2(shortcut, Cotangent(Mutex::new(Some(g))))
            } else {
                branch.mul(&g)?.sum_all()? + shortcut.mul(&g)?.sum_all()?
            }
        }
        Seeds::Interleaved { first, second } => {
            let (g1, g2) = deinterleave(&g)?;
            seed_root(first, g1)? + seed_root(second, g2)?
        }
        Seeds::Tail { anchor, slot, shortcut } => {
            let g = relu_backward(output, g)?;
            *slot.lock().map_err(|_| candle_core::Error::Msg("tail slot lock poisoned".into()))? = Some(g.clone());
            anchor + shortcut.apply_op1(Cotangent(Mutex::new(Some(g))))?
        }
    }
}

/// `relu(a + b)` as a new leaf in `a`'s memory order, written in one pass into a vector the leaf
/// then owns (on CPU).
fn rectified_sum(a: &Tensor, b: &Tensor) -> Result<Var> {
    fn sum<T: Act>(a: &Tensor, b: &Tensor, order: Order) -> Result<Vec<T>> {
        with_activation_in(a, order, |a: &[T]| {
            with_activation_in(b, order, |b: &[T]| {
                let mut out = unwritten::<T>(a.len());
                out.par_chunks_mut(SPAN).zip(a.par_chunks(SPAN)).zip(b.par_chunks(SPAN)).for_each(|((o, a), b)| {
                    simd::run!(o.iter_mut().zip(a).zip(b).for_each(|((o, a), b)| *o = MaybeUninit::new(a.add_relu(*b))))
                });
                // SAFETY: `a` and `b` have `out`'s length (same shape), so the chunks pair up
                // and every element is written.
                unsafe { written(out) }
            })
        })?
    }
    if a.shape() != b.shape() || a.dtype() != b.dtype() {
        candle_core::bail!("residual sum of {:?} {:?} and {:?} {:?}", a.shape(), a.dtype(), b.shape(), b.dtype());
    }
    let order = Order::of(a.layout()).unwrap_or(Order::Nchw);
    match (a.device(), a.dtype()) {
        (Device::Cpu, DType::F32) => leaf_from_vec(sum::<f32>(a, b, order)?, a.shape(), order, a.device()),
        (Device::Cpu, DType::F64) => leaf_from_vec(sum::<f64>(a, b, order)?, a.shape(), order, a.device()),
        (Device::Cpu, DType::BF16) => leaf_from_vec(sum::<half::bf16>(a, b, order)?, a.shape(), order, a.device()),
        // Elsewhere (and f16, which no CPU path computes in) a copy of candle's result.
        _ => Var::from_tensor(&(a.detach() + b.detach())?.relu()?),
    }
}

/// `g ⊙ [y > 0]` for `y = relu(z)`, in `y`'s memory order: one pass on CPU.
fn relu_backward(y: &Tensor, g: Tensor) -> Result<Tensor> {
    fn mask<T: Act>(y: &Tensor, g: &Tensor) -> Result<Tensor> {
        let (v, order) = with_activation(y, |ys: &[T], order| {
            let v = with_activation_in(g, order, |gs: &[T]| {
                let mut out = unwritten::<T>(ys.len());
                out.par_chunks_mut(SPAN).zip(ys.par_chunks(SPAN)).zip(gs.par_chunks(SPAN)).for_each(|((o, y), g)| {
                    simd::run!({
                        o.iter_mut()
                            .zip(y)
                            .zip(g)
                            .for_each(|((o, y), g)| *o = MaybeUninit::new(if y.positive() { *g } else { T::zero() }))
                    })
                });
                // SAFETY: `g` has `y`'s shape, so the chunks pair up and every element is written.
                unsafe { written(out) }
            });
            (v, order)
        })?;
        activation_from_vec(v?, y.shape(), order, y.device())
    }
    match (y.device(), y.dtype()) {
        (Device::Cpu, DType::F32) if g.dtype() == DType::F32 => mask::<f32>(y, &g),
        (Device::Cpu, DType::F64) if g.dtype() == DType::F64 => mask::<f64>(y, &g),
        (Device::Cpu, DType::BF16) if g.dtype() == DType::BF16 => mask::<half::bf16>(y, &g),
        _ => g.mul(&y.gt(0.0)?.to_dtype(g.dtype())?),
    }
}

/// A scalar whose backward seeds `t` with cotangent `g` (same shape).
fn seed_root(t: &Tensor, g: Tensor) -> Result<Tensor> {
    if t.device().is_cpu() {
        t.apply_op1(Cotangent(Mutex::new(Some(g))))
    } else {
        t.mul(&g)?.sum_all()
    }
}

/// A scalar whose gradient with respect to its argument(s) is the given cotangent. Only ever
/// the root of one backward (where candle seeds a gradient of one), so `bwd` ignores `grad_res`
/// and hands the cotangent over instead of keeping a reference alive through the backward.
struct Cotangent(Mutex<Option<Tensor>>);

impl Cotangent {
    fn take(&self) -> Result<Tensor> {
        let mut g = self.0.lock().map_err(|_| candle_core::Error::Msg("cotangent lock poisoned".into()))?;
        g.take().ok_or_else(|| candle_core::Error::Msg("cotangent seeded twice".into()))
    }
}

/// The value of the root is never read: only the graph matters.
fn zero_scalar() -> (CpuStorage, Shape) {
    (CpuStorage::F32(vec![0.0]), Shape::from(()))
}

impl CustomOp1 for Cotangent {
    fn name(&self) -> &'static str {
        "cotangent"
    }

    fn cpu_fwd(&self, _s: &CpuStorage, _l: &Layout) -> Result<(CpuStorage, Shape)> {
        Ok(zero_scalar())
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, _grad_res: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(self.take()?))
    }
}

/// Both arguments get the same cotangent (the two terms of a sum).
impl CustomOp2 for Cotangent {
    fn name(&self) -> &'static str {
        "cotangent2"
    }

    fn cpu_fwd(&self, _s1: &CpuStorage, _l1: &Layout, _s2: &CpuStorage, _l2: &Layout) -> Result<(CpuStorage, Shape)> {
        Ok(zero_scalar())
    }

    fn bwd(
        &self,
        _a: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        _grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let g = self.take()?;
        Ok((Some(g.clone()), Some(g)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A residual link against candle's own `relu(branch + shortcut)` backward, with the
    /// shortcut the link's input itself (an identity block) so the two cotangents must add up,
    /// and sums of both signs so the mask matters; f32 and f64.
    /// The same values laid out channels-last (a graph-connected copy, as a convolution's
    /// output is).
    fn nhwc(t: &Tensor) -> Result<Tensor> {
        t.permute((0, 2, 3, 1))?.contiguous()?.permute((0, 3, 1, 2))
    }

    /// A leaf holding `t`'s values in `order`.
    fn leaf(t: &Tensor, order: Order) -> Result<Var> {
        match order {
            Order::Nchw => Var::from_tensor(t),
            Order::Nhwc => Var::from_tensor(&t.permute((0, 2, 3, 1))?.contiguous()?.permuted_variable((0, 3, 1, 2))?),
        }
    }

    /// ... also on channels-last activations, whose output keeps their order (the cotangent
    /// arrives NCHW here: the order of whatever consumes the output).
    #[test]
    fn residual_link_matches_candle_composition() -> Result<()> {
        for (dtype, order) in [(DType::F32, Order::Nchw), (DType::F64, Order::Nchw), (DType::F32, Order::Nhwc)] {
            let dev = Device::Cpu;
            // No exact zeros: ReLU's subgradient at 0 is candle's 1, the link's 0.
            let vals: Vec<f64> = (0..48).map(|i| ((i * 7 % 11) as f64 - 5.0) / 3.0 + 0.05).collect();
            let x = leaf(&Tensor::from_vec(vals.clone(), (2, 3, 2, 4), &dev)?.to_dtype(dtype)?, order)?;
            let w = Tensor::from_vec(vals.iter().rev().copied().collect(), (2, 3, 2, 4), &dev)?.to_dtype(dtype)?;
            let g =
                Tensor::from_vec(vals.iter().map(|v| v * v - 1.0).collect(), (2, 3, 2, 4), &dev)?.to_dtype(dtype)?;
            let branch = |x: &Tensor| match order {
                Order::Nchw => x.mul(&w)?.tanh(),
                Order::Nhwc => nhwc(&x.mul(&w)?.tanh()?),
            };

            let y_ref = (branch(x.as_tensor())? + x.as_tensor())?.relu()?;
            let want = y_ref.mul(&g)?.sum_all()?.backward()?;
            let link = Link::residual(Some(x.clone()), branch(x.as_tensor())?, x.as_tensor().clone())?;
            assert!(link.output.is_variable(), "the output is the next link's leaf");
            assert_eq!(Order::of(link.output.layout()), Some(order));
            let got = link.backward(g.clone())?;

            let diff = |a: &Tensor, b: &Tensor| -> Result<f64> {
                a.sub(b)?.abs()?.max_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()
            };
            assert!(diff(&link.output, &y_ref)? < 1e-6, "{dtype:?} output");
            let (gx, rx) = (got.get(x.as_tensor()).expect("dx"), want.get(x.as_tensor()).expect("dx"));
            assert!(diff(gx, rx)? < 1e-6, "{dtype:?} dx {gx} vs {rx}");
            // A second pass over the retained graph (a LoCo shared stage), then the last one,
            // which gives the graph up: both the same gradient again.
            let again = link.backward(g.clone())?;
            assert_eq!(diff(again.get(x.as_tensor()).expect("dx"), gx)?, 0.0, "{dtype:?} second pass");
            let (last, input) = link.last_backward(g)?;
            let input = input.expect("the link's leaf comes back");
            assert_eq!(diff(last.get(input.as_tensor()).expect("dx"), gx)?, 0.0, "{dtype:?} last pass");
        }
        Ok(())
    }

    /// A block tail (`relu(bn(z) + shortcut)` in one op) against candle's composition of the
    /// composed batch norm, add and ReLU: output and the gradients of the block input (which
    /// feeds both z and the shortcut), γ and β.
    /// Also channels-last (block input, branch and output NHWC; the cotangent NCHW).
    #[test]
    fn tail_link_matches_candle_composition() -> Result<()> {
        for order in [Order::Nchw, Order::Nhwc] {
            tail_link_in(order)?;
        }
        Ok(())
    }

    fn tail_link_in(order: Order) -> Result<()> {
        use crate::nn::batch_norm::{batch_norm2d, use_composed_reference};
        use crate::nn::ParamBuilder;
        let dev = Device::Cpu;
        let vals: Vec<f64> = (0..48).map(|i| ((i * 7 % 13) as f64 - 6.0) / 4.0).collect();
        let x = leaf(&Tensor::from_vec(vals.clone(), (2, 3, 2, 4), &dev)?, order)?;
        let w = Tensor::from_vec(vals.iter().rev().copied().collect(), (2, 3, 2, 4), &dev)?;
        let g = Tensor::from_vec(vals.iter().map(|v| v * v - 1.0).collect(), (2, 3, 2, 4), &dev)?;
        let z = x.as_tensor().mul(&w)?.sin()?;
        let z = if order == Order::Nhwc { nhwc(&z)? } else { z };

        let pb = ParamBuilder::new(0, &dev, DType::F64);
        let (bn_ref, bn) = (batch_norm2d(3, false, &pb.pp("a"))?, batch_norm2d(3, false, &pb.pp("b"))?);
        use_composed_reference(true);
        let reference = bn_ref.forward_t(&z, true);
        use_composed_reference(false);
        let y_ref = (reference? + x.as_tensor())?.relu()?;
        let want = y_ref.mul(&g)?.sum_all()?.backward()?;

        let op = bn.fused_train_op(&z)?.expect("CPU f64 takes the fused op");
        let link = Link::tail(Some(x.clone()), &z, op, bn.weight(), bn.bias(), x.as_tensor().clone())?;
        let got = link.backward(g.clone())?;
        let output = link.output.clone();
        // The last pass (graph given up) repeats the first exactly.
        let again = link.backward(g.clone())?;
        let (last, _) = link.last_backward(g)?;
        for t in [x.as_tensor(), bn.weight(), bn.bias()] {
            for other in [&again, &last] {
                let (a, b) = (got.get(t).expect("grad"), other.get(t).expect("grad"));
                assert_eq!(a.sub(b)?.abs()?.max_all()?.to_scalar::<f64>()?, 0.0, "repeated pass");
            }
        }

        let diff = |a: &Tensor, b: &Tensor| -> Result<f64> {
            let d = a.sub(b)?.abs()?.max_all()?.to_scalar::<f64>()?;
            Ok(d / b.abs()?.max_all()?.to_scalar::<f64>()?.max(1e-12))
        };
        assert!(diff(&output, &y_ref)? < 1e-10, "output");
        assert_eq!(Order::of(output.layout()), Some(order));
        for (name, a, b) in [
            ("x", x.as_tensor(), x.as_tensor()),
            ("gamma", bn.weight(), bn_ref.weight()),
            ("beta", bn.bias(), bn_ref.bias()),
        ] {
            let (ga, gb) = (got.get(a).expect(name), want.get(b).expect(name));
            assert!(diff(ga, gb)? < 1e-10, "{name}: {ga} vs {gb}");
        }
        Ok(())
    }
}
