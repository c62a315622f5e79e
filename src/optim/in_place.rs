//! Optimizer updates as in-place CPU loops: no temporary tensor of a parameter's size.
//!
//! Composed of candle ops, one LARS update of a parameter with `P` elements allocates about
//! nine `P`-sized tensors (`w·wd`, `g + w·wd`, two f64 copies for each norm, `lr·trust·g`,
//! `m·v`, the new `v`, `w − v`). The trainer applies the optimizer to each node as soon as its
//! gradients are final (`exec::train::update_when_final`), *inside* the step, so these
//! temporaries add to the step's peak memory: ≈ 0.6 GB for Progressive ResNet-50's last
//! decoder (a 4096×4096 weight). Here the norms are one read pass and the momentum and the
//! weight are updated where they are; only the first step allocates `v` (state).
//!
//! AdamW's update, composed, is twelve passes on one thread, each allocating (5 % of a bf16
//! ResNet-50 step); here it is three parallel passes: the two moments, then the weight.
//!
//! Each element is computed with exactly the operations, in the same order and precision, as
//! the composed path (`lars.rs`, `adamw.rs`; candle's `t * s` is `t·s + 0`, `t + s` is
//! `t·1 + s`), so results are bit-identical apart from LARS's norms' f64 sums, whose summation
//! order may differ in the last bit.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, DType, InplaceOp2, InplaceOp3, Layout, Result, Tensor, WithDType};
use rayon::prelude::*;

use crate::cpu_slice::with_slice;
use crate::simd;

/// One LARS update's scalars (see `Lars`): `gd = g + wd·w` when `decay` is set, else `g`;
/// `s = lr·trust`; `v ← m·v + s·gd`; `w ← w − (nesterov ? m·v + s·gd : v)`.
#[derive(Clone, Copy, Debug)]
pub(super) struct LarsUpdate {
    pub decay: Option<f64>,
    pub scale: f64,
    pub momentum: f64,
    pub nesterov: bool,
}

/// Whether the in-place path applies: CPU tensors of one float dtype, contiguous, same shape.
pub(super) fn supported(ts: &[&Tensor]) -> bool {
    let first = ts[0];
    matches!(first.dtype(), DType::F32 | DType::F64)
        && ts.iter().all(|t| {
            t.device().is_cpu() && t.dtype() == first.dtype() && t.shape() == first.shape() && t.is_contiguous()
        })
}

/// `g + wd·w` exactly as candle's `g + affine(w, wd, 0)` computes it in `T`.
#[inline(always)]
fn decayed<T: WithDType>(g: T, w: T, wd: Option<T>) -> T {
    match wd {
        Some(wd) => g + (w * wd + T::zero()),
        None => g,
    }
}

/// `(‖w‖, ‖g + wd·w‖)`, accumulated in f64, for [`supported`] tensors.
pub(super) fn norms(w: &Tensor, g: &Tensor, decay: Option<f64>) -> Result<(f64, f64)> {
    fn go<T: WithDType>(w: &Tensor, g: &Tensor, decay: Option<f64>) -> Result<(f64, f64)> {
        let wd = decay.map(T::from_f64);
        with_slice(w, |w: &[T]| {
            with_slice(g, |g: &[T]| {
                w.iter().zip(g).fold((0f64, 0f64), |(a, b), (&w, &g)| {
                    let (wf, gf) = (w.to_f64(), decayed(g, w, wd).to_f64());
                    (a + wf * wf, b + gf * gf)
                })
            })
        })?
    }
    let (a, b) = match w.dtype() {
        DType::F32 => go::<f32>(w, g, decay)?,
        DType::F64 => go::<f64>(w, g, decay)?,
        d => candle_core::bail!("lars: unsupported dtype {d:?}"),
    };
    Ok((a.sqrt(), b.sqrt()))
}

/// A fresh momentum buffer `s·gd` (the first step: `v` starts at 0).
pub(super) fn first_momentum(w: &Tensor, g: &Tensor, u: LarsUpdate) -> Result<Tensor> {
    fn go<T: WithDType>(w: &Tensor, g: &Tensor, u: LarsUpdate) -> Result<Tensor> {
        let (wd, s) = (u.decay.map(T::from_f64), T::from_f64(u.scale));
        let v = with_slice(w, |w: &[T]| {
            with_slice(g, |g: &[T]| w.iter().zip(g).map(|(&w, &g)| decayed(g, w, wd) * s + T::zero()).collect())
        })??;
        Tensor::from_vec::<_, T>(v, w.shape(), w.device())
    }
    match w.dtype() {
        DType::F32 => go::<f32>(w, g, u),
        DType::F64 => go::<f64>(w, g, u),
        d => candle_core::bail!("lars: unsupported dtype {d:?}"),
    }
}

/// `v ← m·v + s·gd` in place on `v`, reading `(g, w)`.
pub(super) struct Momentum(pub LarsUpdate);

/// `w ← w − (nesterov ? m·v + s·gd : v)` in place on `w`, reading `(v, g)`; `v` already updated.
pub(super) struct Apply(pub LarsUpdate);

/// Calls `f(dst, src2, src3)` with an in-place op's three operands as slices of one dtype;
/// errors name the op (`name`).
fn with_operands(
    name: &str,
    s1: &mut CpuStorage,
    l1: &Layout,
    (s2, l2): (&CpuStorage, &Layout),
    (s3, l3): (&CpuStorage, &Layout),
    f32_op: impl FnOnce(&mut [f32], &[f32], &[f32]),
    f64_op: impl FnOnce(&mut [f64], &[f64], &[f64]),
) -> Result<()> {
    let range = |l: &Layout| {
        l.contiguous_offsets().ok_or_else(|| candle_core::Error::Msg(format!("{name}: operand is not contiguous")))
    };
    let ((a1, b1), (a2, b2), (a3, b3)) = (range(l1)?, range(l2)?, range(l3)?);
    if b1 - a1 != b2 - a2 || b1 - a1 != b3 - a3 {
        candle_core::bail!("{name}: operands of {}, {} and {} elements", b1 - a1, b2 - a2, b3 - a3);
    }
    match s1 {
        CpuStorage::F32(d) => f32_op(&mut d[a1..b1], &s2.as_slice()?[a2..b2], &s3.as_slice()?[a3..b3]),
        CpuStorage::F64(d) => f64_op(&mut d[a1..b1], &s2.as_slice()?[a2..b2], &s3.as_slice()?[a3..b3]),
        d => candle_core::bail!("{name}: unsupported dtype {:?}", d.dtype()),
    }
    Ok(())
}

impl Momentum {
    fn run<T: WithDType>(&self, v: &mut [T], g: &[T], w: &[T]) {
        let u = self.0;
        let (wd, s, m) = (u.decay.map(T::from_f64), T::from_f64(u.scale), T::from_f64(u.momentum));
        for ((v, &g), &w) in v.iter_mut().zip(g).zip(w) {
            *v = (*v * m + T::zero()) + (decayed(g, w, wd) * s + T::zero());
        }
    }
}

impl InplaceOp3 for Momentum {
    fn name(&self) -> &'static str {
        "lars-momentum"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<()> {
        with_operands(self.name(), s1, l1, (s2, l2), (s3, l3), |v, g, w| self.run(v, g, w), |v, g, w| self.run(v, g, w))
    }
}

impl Apply {
    fn run<T: WithDType>(&self, w: &mut [T], v: &[T], g: &[T]) {
        let u = self.0;
        let (wd, s, m) = (u.decay.map(T::from_f64), T::from_f64(u.scale), T::from_f64(u.momentum));
        for ((w, &v), &g) in w.iter_mut().zip(v).zip(g) {
            let update = if u.nesterov { (v * m + T::zero()) + (decayed(g, *w, wd) * s + T::zero()) } else { v };
            *w -= update;
        }
    }
}

impl InplaceOp3 for Apply {
    fn name(&self) -> &'static str {
        "lars-apply"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<()> {
        with_operands(self.name(), s1, l1, (s2, l2), (s3, l3), |w, v, g| self.run(w, v, g), |w, v, g| self.run(w, v, g))
    }
}

/// Elements per parallel task of an AdamW pass.
const SPAN: usize = 1 << 14;

/// The float types the AdamW passes run on, with the square root candle's `sqrt` takes.
trait Real: WithDType {
    fn sqrt(self) -> Self;
}

impl Real for f32 {
    #[inline(always)]
    fn sqrt(self) -> Self {
        f32::sqrt(self)
    }
}

impl Real for f64 {
    #[inline(always)]
    fn sqrt(self) -> Self {
        f64::sqrt(self)
    }
}

/// The contiguous elements of an in-place op's operand.
fn range(l: &Layout) -> Result<std::ops::Range<usize>> {
    l.contiguous_offsets()
        .map(|(a, b)| a..b)
        .ok_or_else(|| candle_core::Error::Msg("adamw: operand is not contiguous".into()))
}

/// `m ← β·m + (1−β)·g` in place on `m`, reading `g`; with `square`, `v ← β·v + (1−β)·g²`.
pub(super) struct Moment {
    pub beta: f64,
    pub square: bool,
}

impl Moment {
    fn run<T: WithDType>(&self, m: &mut [T], g: &[T]) {
        let (b, rest, zero) = (T::from_f64(self.beta), T::from_f64(1.0 - self.beta), T::zero());
        let square = self.square;
        m.par_chunks_mut(SPAN).zip(g.par_chunks(SPAN)).for_each(|(m, g)| {
            simd::run!(for (m, &g) in m.iter_mut().zip(g) {
                let g = if square { g * g } else { g };
                *m = (*m * b + zero) + (g * rest + zero);
            })
        });
    }
}

impl InplaceOp2 for Moment {
    fn name(&self) -> &'static str {
        "adamw-moment"
    }

    fn cpu_fwd(&self, s1: &mut CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<()> {
        let (r1, r2) = (range(l1)?, range(l2)?);
        if r1.len() != r2.len() {
            candle_core::bail!("adamw: a moment of {} elements and a gradient of {}", r1.len(), r2.len());
        }
        match s1 {
            CpuStorage::F32(m) => self.run(&mut m[r1], &s2.as_slice()?[r2]),
            CpuStorage::F64(m) => self.run(&mut m[r1], &s2.as_slice()?[r2]),
            m => candle_core::bail!("adamw: unsupported dtype {:?}", m.dtype()),
        }
        Ok(())
    }
}

/// `w ← w·(1−lr·wd) − step_size · m / (√v · inv_bc2 + eps)` in place on `w`, reading `(m, v)`
/// (already updated); `decay` is the factor `1 − lr·wd` where the parameter decays.
pub(super) struct AdamApply {
    pub decay: Option<f64>,
    pub inv_bc2: f64,
    pub eps: f64,
    pub step_size: f64,
}

impl AdamApply {
    fn run<T: Real>(&self, w: &mut [T], m: &[T], v: &[T]) {
        let decay = self.decay.map(T::from_f64);
        let (inv_bc2, eps, ss, one, zero) =
            (T::from_f64(self.inv_bc2), T::from_f64(self.eps), T::from_f64(self.step_size), T::one(), T::zero());
        w.par_chunks_mut(SPAN).zip(m.par_chunks(SPAN).zip(v.par_chunks(SPAN))).for_each(|(w, (m, v))| {
            simd::run!(for ((w, &m), &v) in w.iter_mut().zip(m).zip(v) {
                let w0 = match decay {
                    Some(f) => *w * f + zero,
                    None => *w,
                };
                let denom = (v.sqrt() * inv_bc2 + zero) * one + eps;
                *w = w0 - ((m / denom) * ss + zero);
            })
        });
    }
}

impl InplaceOp3 for AdamApply {
    fn name(&self) -> &'static str {
        "adamw-apply"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<()> {
        with_operands(self.name(), s1, l1, (s2, l2), (s3, l3), |w, m, v| self.run(w, m, v), |w, m, v| self.run(w, m, v))
    }
}
