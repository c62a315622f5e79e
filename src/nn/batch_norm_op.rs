//! Training-mode batch normalisation as one op over NCHW, forward and backward.
//!
//! Composed from candle ops, a BatchNorm costs two strided reductions over (N, H, W), four
//! broadcast passes in the forward and about twice that in the backward, each allocating a
//! full-size tensor (page faults were 13 % of a step; docs/performance.md). Here the statistics
//! are one pass over a channels-last input (two, mean then centred squares, over NCHW or when
//! synchronised across ranks), the output is one pass, and the backward is two: the per-channel
//! sums `Σ dy` and `Σ dy·x̂`, then `dx`. Statistics accumulate in f64 whatever the activations'
//! type.
//!
//! With `relu`, the op is `relu(bn(x))`: a ReLU after a BatchNorm costs candle one pass forward
//! and six in its backward (a zero tensor, a comparison, a cast, a product, and the gradient
//! store's zero-and-add), each allocating; fused, the forward clamps as it writes and the
//! backward masks `dy` by `y > 0` as it reads it.

use std::mem::MaybeUninit;
use std::sync::Arc;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor, Var};
use rayon::prelude::*;

pub(crate) use super::act::Act;
use super::act::Lane;
use crate::cpu_slice::{
    activation_from_vec, leaf_from_vec, storage_activation, storage_slice, unwritten, with_activation,
    with_activation_in, with_slice, written, Order,
};
use crate::dist::Communicator;
use crate::simd;

/// Per-channel batch statistics of `[N, C, H, W]`: mean and biased variance.
#[derive(Clone, Debug, PartialEq)]
pub struct ChannelStats {
    pub mean: Vec<f64>,
    pub var: Vec<f64>,
    /// Values per channel, `N·H·W` (summed over the ranks for synchronised statistics).
    pub count: usize,
}

/// The statistics of an `[N, C, H, W]` CPU tensor (f32, f64 or bf16): in one shifted pass
/// where it is channels-last, else in two passes per channel (mean, then the centred sum of
/// squares); neither cancels for large means.
pub fn channel_stats(x: &Tensor) -> Result<ChannelStats> {
    channel_stats_in(x, None)
}

/// [`channel_stats`] of the batch that every rank of `group` holds a share of: the sums of each
/// pass are all-reduced (the mean's, with the counts, then the centred squares'), so every rank
/// gets the statistics one process computes on the whole batch (to rounding: one process
/// takes the one-pass path on a channels-last input). `None` or one rank: [`channel_stats`].
pub fn channel_stats_in(x: &Tensor, group: Option<&Arc<dyn Communicator>>) -> Result<ChannelStats> {
    let (n, c, h, w) = x.dims4()?;
    let dims = (n, c, h * w);
    let group = group.filter(|g| g.size() > 1);
    if group.is_none() {
        if let Some(stats) = one_pass_stats(x)? {
            return Ok(stats);
        }
    }
    let mut sums = match x.dtype() {
        DType::F32 => with_activation(x, |v: &[f32], o| channel_sums(v, o, dims, None))?,
        DType::F64 => with_activation(x, |v: &[f64], o| channel_sums(v, o, dims, None))?,
        DType::BF16 => with_activation(x, |v: &[half::bf16], o| channel_sums(v, o, dims, None))?,
        d => candle_core::bail!("batch norm: unsupported dtype {d:?}"),
    };
    let mut count = (n * h * w) as f64;
    if let Some(g) = group {
        sums.push(count);
        g.all_reduce_sum(&mut sums).map_err(candle_core::Error::wrap)?;
        count = sums.pop().unwrap_or(0.0);
    }
    let mean: Vec<f64> = sums.iter().map(|s| s / count).collect();
    let mut ss = match x.dtype() {
        DType::F32 => with_activation(x, |v: &[f32], o| channel_sums(v, o, dims, Some(&mean)))?,
        DType::F64 => with_activation(x, |v: &[f64], o| channel_sums(v, o, dims, Some(&mean)))?,
        DType::BF16 => with_activation(x, |v: &[half::bf16], o| channel_sums(v, o, dims, Some(&mean)))?,
        d => candle_core::bail!("batch norm: unsupported dtype {d:?}"),
    };
    if let Some(g) = group {
        g.all_reduce_sum(&mut ss).map_err(candle_core::Error::wrap)?;
    }
    let var = ss.iter().map(|s| s / count).collect();
    Ok(ChannelStats { mean, var, count: count as usize })
}

/// The statistics of one process's NHWC activation in one pass over it: per channel the sums
/// of `d = x − s` and `d²`, `s` the channel's value at the first pixel (a shift near the mean,
/// so that `Σd²/n − (Σd/n)²` does not cancel the variance away), in f64. The two-pass
/// statistics read the activation twice: 4 % of a bf16 ResNet-50 step. `None` for NCHW, where
/// the two passes stay.
fn one_pass_stats(x: &Tensor) -> Result<Option<ChannelStats>> {
    /// `(s, [Σd, Σd²])` per channel.
    fn go<T: Act>(x: &[T], c: usize) -> (Vec<f64>, Vec<f64>) {
        let shift: Vec<f64> = x[..c].iter().map(|v| v.wide()).collect();
        let sums = pixel_sums::<2>(x.len(), c, |run, out| {
            let x = &x[run];
            simd::run!(run_sums(x.len() / c, c, &Shifted { x, s: &shift }, out))
        });
        (shift, sums)
    }
    let (n, c, h, w) = x.dims4()?;
    let count = n * h * w;
    if count == 0 || c == 0 {
        return Ok(None);
    }
    let sums = match x.dtype() {
        DType::F32 => with_activation(x, |v: &[f32], o| (o == Order::Nhwc).then(|| go(v, c)))?,
        DType::F64 => with_activation(x, |v: &[f64], o| (o == Order::Nhwc).then(|| go(v, c)))?,
        DType::BF16 => with_activation(x, |v: &[half::bf16], o| (o == Order::Nhwc).then(|| go(v, c)))?,
        d => candle_core::bail!("batch norm: unsupported dtype {d:?}"),
    };
    let Some((shift, sums)) = sums else { return Ok(None) };
    let (d, d2) = sums.split_at(c);
    let (mean, var) = (0..c)
        .map(|ch| {
            let m = d[ch] / count as f64;
            (shift[ch] + m, (d2[ch] / count as f64 - m * m).max(0.0))
        })
        .unzip();
    Ok(Some(ChannelStats { mean, var, count }))
}

/// Per channel, `Σ x` (`centre` None) or `Σ (x − centre)²`: NCHW each channel summed by one
/// thread in image order, NHWC in fixed runs of pixels added in order (the same bits for any
/// thread count either way).
fn channel_sums<T: Act>(x: &[T], order: Order, (n, c, hw): (usize, usize, usize), centre: Option<&[f64]>) -> Vec<f64> {
    if order == Order::Nhwc {
        return pixel_sums::<1>(x.len(), c, |run, out| {
            let x = &x[run];
            simd::run!({
                match centre {
                    Some(m) => run_sums(x.len() / c, c, &Centred { x, m }, out),
                    None => run_sums(x.len() / c, c, &Plain { x }, out),
                }
            })
        });
    }
    (0..c)
        .into_par_iter()
        .map(|ch| {
            // Loops, not `map(..).sum()`: core's `fold` is not inlined into the `run!` body,
            // and would run as baseline code.
            simd::run!({
                let mut total = 0.0;
                for b in 0..n {
                    let p = &x[(b * c + ch) * hw..][..hw];
                    total += match centre {
                        None => lane_sum(p, |v| v),
                        Some(m) => lane_sum(p, |v| (v - m[ch]) * (v - m[ch])),
                    };
                }
                total
            })
        })
        .collect()
}

/// Pixels per parallel task of an NHWC pass: about 4096 values.
fn pixels_per_task(c: usize) -> usize {
    (4096 / c.max(1)).max(1)
}

/// Runs one parallel task of an NHWC sum adds into one accumulator: about 64Ki values. With a
/// partial vector per run, the partials (`K·c` f64 per 4096 values) were as large as half the
/// input, and adding them up ran on one thread: the sums ran at a sixth of memory speed.
const RUNS_PER_TASK: usize = 16;

/// `K` per-channel f64 sums over the pixels of an NHWC activation of `len` values:
/// `run(range, acc)` adds the sums of one run of [`pixels_per_task`] pixels into `acc`
/// ([`run_sums`] inside `simd::run!`). Each task adds [`RUNS_PER_TASK`] runs in order, and the
/// tasks' sums are added in order, so the result does not depend on the thread count.
fn pixel_sums<const K: usize>(
    len: usize,
    c: usize,
    run: impl Fn(std::ops::Range<usize>, &mut [f64]) + Sync,
) -> Vec<f64> {
    let step = pixels_per_task(c) * c;
    let task = step * RUNS_PER_TASK;
    let partial: Vec<Vec<f64>> = (0..len.div_ceil(task))
        .into_par_iter()
        .map(|t| {
            let end = len.min((t + 1) * task);
            let mut acc = vec![0f64; K * c];
            for a in (t * task..end).step_by(step) {
                run(a..end.min(a + step), &mut acc);
            }
            acc
        })
        .collect();
    let mut total = vec![0f64; K * c];
    for p in partial {
        for (t, v) in total.iter_mut().zip(p) {
            *t += v;
        }
    }
    total
}

/// Channels an NHWC run sums together: one AVX-512 vector of f64.
const BLOCK: usize = 8;
/// Accumulators per channel block of an NHWC run: pixel `p` goes into chain `p % CHAINS`, the
/// chains are added at the end of the run. One chain per block is one add per add-latency;
/// with channels as the only parallelism a 16-channel map kept two vector adds in flight.
const CHAINS: usize = 4;

/// `K` f64 sums per channel over the `pixels` pixels of one NHWC run of `c` channels, added
/// into `out` (`K` rows of `c`). Channels go in blocks of [`BLOCK`] whose accumulators stay in
/// registers, each block's pixels in [`CHAINS`] chains; the order is fixed, so the sums do not
/// depend on the thread count.
#[inline(always)]
fn run_sums<const K: usize>(pixels: usize, c: usize, terms: &impl Terms<K>, out: &mut [f64]) {
    for ch in (0..c).step_by(BLOCK) {
        let w = BLOCK.min(c - ch);
        let mut chains = [[[0f64; BLOCK]; K]; CHAINS];
        if w == BLOCK {
            let whole = pixels / CHAINS * CHAINS;
            for p in (0..whole).step_by(CHAINS) {
                for (q, acc) in chains.iter_mut().enumerate() {
                    terms.add((p + q) * c + ch, ch, BLOCK, acc);
                }
            }
            for p in whole..pixels {
                terms.add(p * c + ch, ch, BLOCK, &mut chains[0]);
            }
        } else {
            for p in 0..pixels {
                terms.add(p * c + ch, ch, w, &mut chains[0]);
            }
        }
        for k in 0..K {
            for j in 0..w {
                let mut total = 0.0;
                for acc in &chains {
                    total += acc[k][j];
                }
                out[k * c + ch + j] += total;
            }
        }
    }
}

/// What an NHWC run sums per channel: `add(at, ch, w, acc)` adds the terms of the `w` channels
/// from `ch` of the pixel whose block starts at value `at` into `acc[k][..w]`. A trait with
/// `#[inline(always)]` methods, not a closure: a closure's body was compiled on its own, for
/// baseline x86-64, outside the `simd::run!` function that calls it.
trait Terms<const K: usize> {
    fn add(&self, at: usize, ch: usize, w: usize, acc: &mut [[f64; BLOCK]; K]);
}

/// `Σ x`.
struct Plain<'a, T> {
    x: &'a [T],
}

impl<T: Act> Terms<1> for Plain<'_, T> {
    #[inline(always)]
    fn add(&self, at: usize, _: usize, w: usize, acc: &mut [[f64; BLOCK]; 1]) {
        let v = &self.x[at..at + w];
        for j in 0..w {
            acc[0][j] += v[j].wide();
        }
    }
}

/// `Σ (x − m)²`.
struct Centred<'a, T> {
    x: &'a [T],
    m: &'a [f64],
}

impl<T: Act> Terms<1> for Centred<'_, T> {
    #[inline(always)]
    fn add(&self, at: usize, ch: usize, w: usize, acc: &mut [[f64; BLOCK]; 1]) {
        let (v, m) = (&self.x[at..at + w], &self.m[ch..ch + w]);
        for j in 0..w {
            let d = v[j].wide() - m[j];
            acc[0][j] += d * d;
        }
    }
}

/// `Σ (x − s)` and `Σ (x − s)²`.
struct Shifted<'a, T> {
    x: &'a [T],
    s: &'a [f64],
}

impl<T: Act> Terms<2> for Shifted<'_, T> {
    #[inline(always)]
    fn add(&self, at: usize, ch: usize, w: usize, acc: &mut [[f64; BLOCK]; 2]) {
        let (v, s) = (&self.x[at..at + w], &self.s[ch..ch + w]);
        for j in 0..w {
            let d = v[j].wide() - s[j];
            acc[0][j] += d;
            acc[1][j] += d * d;
        }
    }
}

/// `Σ g` and `Σ g·(x − m)`, `g` the gradient reaching the normalisation: `dy`, masked by
/// `y > 0` with `relu`.
struct Grad<'a, T> {
    x: &'a [T],
    y: &'a [T],
    dy: &'a [T],
    m: &'a [f64],
    relu: bool,
}

impl<T: Act> Terms<2> for Grad<'_, T> {
    #[inline(always)]
    fn add(&self, at: usize, ch: usize, w: usize, acc: &mut [[f64; BLOCK]; 2]) {
        let (x, dy, m) = (&self.x[at..at + w], &self.dy[at..at + w], &self.m[ch..ch + w]);
        if self.relu {
            let y = &self.y[at..at + w];
            for j in 0..w {
                // Both loaded, then a select: a load under a branch kept the loop scalar.
                let (g, keep) = (dy[j].wide(), y[j].positive());
                let g = if keep { g } else { 0.0 };
                acc[0][j] += g;
                acc[1][j] += g * (x[j].wide() - m[j]);
            }
        } else {
            for j in 0..w {
                let g = dy[j].wide();
                acc[0][j] += g;
                acc[1][j] += g * (x[j].wide() - m[j]);
            }
        }
    }
}

/// Independent f64 partial sums per plane: a sum that is one dependency chain runs at one add per
/// add-latency (4 cycles) and does not vectorise; `LANES` chains do both. Added in a fixed order,
/// so the result does not depend on the thread count.
const LANES: usize = 8;

/// `Σ f(v)` over `p` in f64, in [`LANES`] partial sums.
#[inline(always)]
fn lane_sum<T: Act>(p: &[T], f: impl Fn(f64) -> f64) -> f64 {
    let mut acc = [0f64; LANES];
    let chunks = p.chunks_exact(LANES);
    let mut tail = 0.0;
    for v in chunks.remainder() {
        tail += f(v.wide());
    }
    for chunk in chunks {
        for (a, v) in acc.iter_mut().zip(chunk) {
            *a += f(v.wide());
        }
    }
    let mut total = 0.0;
    for a in acc {
        total += a;
    }
    total + tail
}

/// `(Σ g, Σ g·(x − m))` over one plane, `g` the gradient reaching the normalisation: `dy`, or
/// with `relu` (`y` the op's output) `dy` where `y > 0`; in [`LANES`] partial sums.
#[inline(always)]
fn plane_grad_sums<T: Act>(x: &[T], y: &[T], dy: &[T], m: f64, relu: bool) -> (f64, f64) {
    let (mut a, mut b) = ([0f64; LANES], [0f64; LANES]);
    let mut add = |lane: usize, x: T, y: T, dy: T| {
        let g = if relu && !y.positive() { 0.0 } else { dy.wide() };
        a[lane] += g;
        b[lane] += g * (x.wide() - m);
    };
    let full = x.len() / LANES * LANES;
    if relu {
        for ((x, y), dy) in
            x[..full].chunks_exact(LANES).zip(y[..full].chunks_exact(LANES)).zip(dy[..full].chunks_exact(LANES))
        {
            for j in 0..LANES {
                add(j, x[j], y[j], dy[j]);
            }
        }
        for i in full..x.len() {
            add(0, x[i], y[i], dy[i]);
        }
    } else {
        for (x, dy) in x[..full].chunks_exact(LANES).zip(dy[..full].chunks_exact(LANES)) {
            for j in 0..LANES {
                add(j, x[j], T::one(), dy[j]);
            }
        }
        for i in full..x.len() {
            add(0, x[i], T::one(), dy[i]);
        }
    }
    let (mut sa, mut sb) = (0.0, 0.0);
    for j in 0..LANES {
        sa += a[j];
        sb += b[j];
    }
    (sa, sb)
}

/// Planes per parallel task: about 4096 values, so that small planes (a 4×4 map) do not pay
/// a task and an instruction-set dispatch each.
fn planes_per_task(hw: usize) -> usize {
    (4096 / hw.max(1)).max(1)
}

/// `y = x·s + t` over one plane (then `max(·, 0)` with `relu`), rounded once; with a
/// shortcut `sc`, then `relu(y + sc)`, rounded again (a block tail's sum).
#[inline(always)]
fn affine_plane<T: Act>(x: &[T], y: &mut [MaybeUninit<T>], s: T::W, t: T::W, relu: bool, sc: Option<&[T]>) {
    if let Some(sc) = sc {
        for ((y, x), sc) in y.iter_mut().zip(x).zip(sc) {
            let v = x.lane() * s + t;
            *y = MaybeUninit::new(T::from_lane(if relu { v.relu() } else { v }).add_relu(*sc));
        }
        return;
    }
    if relu {
        y.iter_mut().zip(x).for_each(|(y, x)| *y = MaybeUninit::new(T::from_lane((x.lane() * s + t).relu())));
    } else {
        y.iter_mut().zip(x).for_each(|(y, x)| *y = MaybeUninit::new(T::from_lane(x.lane() * s + t)));
    }
}

/// `y = x·s + t` per channel over one NHWC pixel (then `max(·, 0)` with `relu`), rounded once;
/// with a shortcut `sc`, then `relu(y + sc)`, rounded again.
#[inline(always)]
fn affine_pixel<T: Act>(x: &[T], y: &mut [MaybeUninit<T>], s: &[T::W], t: &[T::W], relu: bool, sc: Option<&[T]>) {
    let (s, t, y) = (&s[..x.len()], &t[..x.len()], &mut y[..x.len()]);
    if let Some(sc) = sc {
        let sc = &sc[..x.len()];
        for i in 0..x.len() {
            let v = x[i].lane() * s[i] + t[i];
            let v = T::from_lane(if relu { v.relu() } else { v });
            y[i] = MaybeUninit::new(v.add_relu(sc[i]));
        }
        return;
    }
    if relu {
        for i in 0..x.len() {
            y[i] = MaybeUninit::new(T::from_lane((x[i].lane() * s[i] + t[i]).relu()));
        }
    } else {
        for i in 0..x.len() {
            y[i] = MaybeUninit::new(T::from_lane(x[i].lane() * s[i] + t[i]));
        }
    }
}

/// `dx = k·g + c·(x − m) + b` over one plane, `[k, c, b, m]` its channel's constants and `g`
/// the gradient reaching the normalisation (`dy`, masked by `y > 0` with `relu`).
#[inline(always)]
fn dx_plane<T: Act>(x: &[T], y: &[T], dy: &[T], dx: &mut [MaybeUninit<T>], [k, c, b, m]: [T::W; 4], relu: bool) {
    if relu {
        for (((dx, x), y), dy) in dx.iter_mut().zip(x).zip(y).zip(dy) {
            let g = if y.positive() { dy.lane() } else { T::W::ZERO };
            *dx = MaybeUninit::new(T::from_lane(k * g + c * (x.lane() - m) + b));
        }
    } else {
        for ((dx, x), dy) in dx.iter_mut().zip(x).zip(dy) {
            *dx = MaybeUninit::new(T::from_lane(k * dy.lane() + c * (x.lane() - m) + b));
        }
    }
}

/// [`dx_plane`] over one NHWC pixel, `[k, c, b, m]` rows of per-channel constants.
#[inline(always)]
fn dx_pixel<T: Act>(x: &[T], y: &[T], dy: &[T], dx: &mut [MaybeUninit<T>], [k, c, b, m]: &[Vec<T::W>; 4], relu: bool) {
    let n = x.len();
    let (dy, dx, k, c, b, m) = (&dy[..n], &mut dx[..n], &k[..n], &c[..n], &b[..n], &m[..n]);
    if relu {
        let y = &y[..n];
        for i in 0..n {
            let g = if y[i].positive() { dy[i].lane() } else { T::W::ZERO };
            dx[i] = MaybeUninit::new(T::from_lane(k[i] * g + c[i] * (x[i].lane() - m[i]) + b[i]));
        }
    } else {
        for i in 0..n {
            dx[i] = MaybeUninit::new(T::from_lane(k[i] * dy[i].lane() + c[i] * (x[i].lane() - m[i]) + b[i]));
        }
    }
}

/// Values per parallel task of a flat elementwise pass.
pub(crate) const SPAN: usize = 1 << 14;

/// `(dx, dγ, dβ)` of [`BatchNormTrain::backward`]; `dx` only when asked for.
pub(crate) type BnGrads<T> = (Option<Vec<T>>, Vec<T>, Vec<T>);

/// `y = (x − mean) · inv_std · γ + β` per channel, with `mean` and `inv_std` fixed (the batch's,
/// computed by [`channel_stats`]); gradients for `x`, `γ` and `β` as in training mode, where the
/// statistics depend on `x`.
///
/// Synchronised ([`Self::synced`], statistics from [`channel_stats_in`]): the backward's two
/// sums are all-reduced too, so `dx` is the global batch's; `dγ` and `dβ` stay this rank's share
/// (summed over the ranks, they are the global batch's: the gradient reducer's job).
#[derive(Clone, Debug)]
pub struct BatchNormTrain {
    mean: Arc<Vec<f64>>,
    inv_std: Arc<Vec<f64>>,
    relu: bool,
    /// Values per channel the statistics were computed over (all ranks').
    count: usize,
    group: Option<Arc<dyn Communicator>>,
    /// The memory order of the input, kept by the output and the input's gradient.
    order: Order,
}

impl BatchNormTrain {
    pub fn new(stats: &ChannelStats, eps: f64) -> Self {
        let inv_std = stats.var.iter().map(|v| 1.0 / (v + eps).sqrt()).collect();
        Self {
            mean: Arc::new(stats.mean.clone()),
            inv_std: Arc::new(inv_std),
            relu: false,
            count: stats.count,
            group: None,
            order: Order::Nchw,
        }
    }

    /// The op for an input laid out as `x` is (NCHW or NHWC; any other view is read as NCHW).
    pub fn for_input(mut self, x: &Tensor) -> Self {
        self.order = Order::of(x.layout()).unwrap_or(Order::Nchw);
        self
    }

    /// The memory order the op reads its input in and writes its output and gradient in.
    pub(crate) fn order(&self) -> Order {
        self.order
    }

    /// `op(x; γ, β)` as a tensor in `x`'s order (the op's own result is `[N, H, W, C]` for an
    /// NHWC input, shown as the permuted view).
    pub fn apply(self, x: &Tensor, gamma: &Tensor, beta: &Tensor) -> Result<Tensor> {
        let op = self.for_input(x);
        let order = op.order;
        let y = x.apply_op3(gamma, beta, op)?;
        match order {
            Order::Nhwc => y.permute((0, 3, 1, 2)),
            Order::Nchw => Ok(y),
        }
    }

    /// The backward all-reduces its sums over `group` (whose statistics `stats` were).
    pub fn synced(mut self, group: Option<Arc<dyn Communicator>>) -> Self {
        self.group = group.filter(|g| g.size() > 1);
        self
    }

    /// `relu(bn(x))` as one op.
    pub fn with_relu(mut self, relu: bool) -> Self {
        self.relu = relu;
        self
    }

    /// `x` in [`Self::for_input`]'s order.
    pub(crate) fn forward<T: Act>(&self, x: &[T], gamma: &[T], beta: &[T], c: usize, hw: usize) -> Vec<T> {
        self.forward_then(x, gamma, beta, (c, hw), None)
    }

    /// [`Self::forward`], then with a `shortcut` (in the same order) `relu(y + shortcut)` in the
    /// same pass, rounded to the type after each step as the two passes would.
    fn forward_then<T: Act>(
        &self,
        x: &[T],
        gamma: &[T],
        beta: &[T],
        (c, hw): (usize, usize),
        shortcut: Option<&[T]>,
    ) -> Vec<T> {
        // Per channel: y = x·scale + shift.
        let (scale, shift): (Vec<f64>, Vec<f64>) = (0..c)
            .map(|ch| {
                let s = self.inv_std[ch] * gamma[ch].wide();
                (s, beta[ch].wide() - self.mean[ch] * s)
            })
            .unzip();
        let (scale, shift): (Vec<T::W>, Vec<T::W>) =
            scale.iter().zip(&shift).map(|(s, t)| (T::W::of(*s), T::W::of(*t))).unzip();
        // SAFETY (both `written` below): `x.len()` is whole pixels (NHWC) or planes (NCHW), and
        // so is every task's chunk but the last, which is whole ones too: every element of `y`
        // is written by exactly one kernel call.
        let mut y = unwritten::<T>(x.len());
        let relu = self.relu;
        if self.order == Order::Nhwc {
            let step = pixels_per_task(c) * c;
            y.par_chunks_mut(step).zip(x.par_chunks(step)).enumerate().for_each(|(task, (y, x))| {
                let sc = shortcut.map(|s| &s[task * step..task * step + x.len()]);
                simd::run!({
                    for (i, (y, x)) in y.chunks_exact_mut(c).zip(x.chunks_exact(c)).enumerate() {
                        affine_pixel(x, y, &scale, &shift, relu, sc.map(|s| &s[i * c..(i + 1) * c]));
                    }
                })
            });
            return unsafe { written(y) };
        }
        let step = planes_per_task(hw) * hw;
        y.par_chunks_mut(step).zip(x.par_chunks(step)).enumerate().for_each(|(task, (y, x))| {
            let sc = shortcut.map(|s| &s[task * step..task * step + x.len()]);
            simd::run!({
                for (i, (y, x)) in y.chunks_exact_mut(hw).zip(x.chunks_exact(hw)).enumerate() {
                    let ch = (task * step / hw + i) % c;
                    affine_plane(x, y, scale[ch], shift[ch], relu, sc.map(|s| &s[i * hw..(i + 1) * hw]));
                }
            })
        });
        unsafe { written(y) }
    }

    /// `(dx, dγ, dβ)`; `dx = γ·inv_std·(dy − mean(dy) − x̂·mean(dy·x̂))`. With `relu`, `dy` is
    /// first masked by `y > 0`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn backward<T: Act>(
        &self,
        x: &[T],
        gamma: &[T],
        y: &[T],
        dy: &[T],
        (n, c, hw): (usize, usize, usize),
        need_dx: bool,
    ) -> Result<BnGrads<T>> {
        let relu = self.relu;
        // Σ dy and Σ dy·x̂ per channel (dy masked by the ReLU where there is one).
        let (sum_dy, sum_dy_xhat): (Vec<f64>, Vec<f64>) = if self.order == Order::Nhwc {
            let (mean, inv_std) = (&self.mean[..c], &self.inv_std[..c]);
            let mut both = pixel_sums::<2>(x.len(), c, |run, out| {
                let (x, dy) = (&x[run.clone()], &dy[run.clone()]);
                let y = if relu { &y[run] } else { &[] };
                simd::run!({ run_sums(x.len() / c, c, &Grad { x, y, dy, m: mean, relu }, out) })
            });
            let b = both.split_off(c);
            (both, b.iter().zip(inv_std).map(|(b, is)| b * is).collect())
        } else {
            (0..c)
                .into_par_iter()
                .map(|ch| {
                    let (m, is) = (self.mean[ch], self.inv_std[ch]);
                    let (mut a, mut b) = (0.0, 0.0);
                    simd::run!({
                        for img in 0..n {
                            let at = (img * c + ch) * hw;
                            let ys = if relu { &y[at..at + hw] } else { &[] };
                            let (pa, pb) = plane_grad_sums(&x[at..at + hw], ys, &dy[at..at + hw], m, relu);
                            a += pa;
                            b += pb;
                        }
                    });
                    (a, b * is)
                })
                .unzip()
        };
        let dgamma = sum_dy_xhat.iter().map(|v| T::narrow(*v)).collect();
        let dbeta = sum_dy.iter().map(|v| T::narrow(*v)).collect();
        // dx needs the whole batch's sums; the parameters' gradients are this rank's share.
        let (sum_dy, sum_dy_xhat) = match (&self.group, need_dx) {
            (Some(g), true) => {
                let mut both: Vec<f64> = sum_dy.iter().chain(&sum_dy_xhat).copied().collect();
                g.all_reduce_sum(&mut both).map_err(candle_core::Error::wrap)?;
                let xhat = both.split_off(c);
                (both, xhat)
            }
            _ => (sum_dy, sum_dy_xhat),
        };
        let dx = need_dx.then(|| {
            let count = self.count as f64;
            // dx = k·(g − mean(g) − x̂·mean(g·x̂)) with k = γ·inv_std, per element in the
            // activations' arithmetic as k·g + c·(x − m) + b: the per-channel constants come
            // from the f64 sums, and `x − m` is taken first so that a large mean cancels exactly.
            let consts: Vec<[T::W; 4]> = (0..c)
                .map(|ch| {
                    let (m, is) = (self.mean[ch], self.inv_std[ch]);
                    let k = gamma[ch].wide() * is;
                    let (mdy, mdyx) = (sum_dy[ch] / count, sum_dy_xhat[ch] / count);
                    [k, -k * is * mdyx, -k * mdy, m].map(T::W::of)
                })
                .collect();
            // SAFETY (both `written` below): as in the forward, the chunks are whole pixels or
            // planes, and each element is written by one kernel call.
            let mut dx = unwritten::<T>(x.len());
            if self.order == Order::Nhwc {
                // The constants as four per-channel rows, read along a pixel's channels.
                let rows: [Vec<T::W>; 4] = std::array::from_fn(|j| consts.iter().map(|k| k[j]).collect());
                let step = pixels_per_task(c) * c;
                dx.par_chunks_mut(step).enumerate().for_each(|(task, dx)| {
                    simd::run!({
                        for (i, dx) in dx.chunks_exact_mut(c).enumerate() {
                            let at = task * step + i * c;
                            let ys = if relu { &y[at..at + c] } else { &[] };
                            dx_pixel(&x[at..at + c], ys, &dy[at..at + c], dx, &rows, relu);
                        }
                    })
                });
                return unsafe { written(dx) };
            }
            let step = planes_per_task(hw) * hw;
            dx.par_chunks_mut(step).enumerate().for_each(|(task, dx)| {
                simd::run!({
                    for (i, dx) in dx.chunks_exact_mut(hw).enumerate() {
                        let plane = task * step / hw + i;
                        let at = plane * hw;
                        let ys = if relu { &y[at..at + hw] } else { &[] };
                        dx_plane(&x[at..at + hw], ys, &dy[at..at + hw], dx, consts[plane % c], relu);
                    }
                })
            });
            unsafe { written(dx) }
        });
        Ok((dx, dgamma, dbeta))
    }

    /// [`Self::forward`] on raw storages (x, γ, β): x in the op's order (NCHW: gathered if
    /// strided), γ and β made contiguous if strided.
    fn forward_storage<T: Act>(
        &self,
        (s1, l1): (&CpuStorage, &Layout),
        (s2, l2): (&CpuStorage, &Layout),
        (s3, l3): (&CpuStorage, &Layout),
        c: usize,
        hw: usize,
    ) -> Result<Vec<T>> {
        let x = match self.order {
            Order::Nchw => storage_slice(s1, l1)?,
            Order::Nhwc => match storage_activation(s1, l1)? {
                (x, Order::Nhwc) => x,
                _ => candle_core::bail!("batch norm: an NHWC op applied to an input that is not NHWC"),
            },
        };
        Ok(self.forward::<T>(&x, &storage_slice(s2, l2)?, &storage_slice(s3, l3)?, c, hw))
    }

    /// The backward on `[N, C, H, W]` tensors (`y` empty where the op has no ReLU), each read in
    /// the op's order; `dx` in it too.
    fn bwd_typed<T: Act>(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (n, c, h, w) = x.dims4()?;
        let order = self.order;
        let dims = (n, c, h * w);
        let (dx, dg, db) = with_activation_in(x, order, |xs: &[T]| {
            with_slice(gamma, |gs: &[T]| {
                let run = |ys: &[T]| {
                    with_activation_in(dy, order, |dys: &[T]| self.backward(xs, gs, ys, dys, dims, x.track_op()))
                };
                if y.elem_count() == 0 {
                    run(&[])
                } else {
                    with_activation_in(y, order, run)?
                }
            })
        })????;
        let dx = dx.map(|v| activation_from_vec(v, x.shape(), order, x.device())).transpose()?;
        Ok((dx, Some(Tensor::from_vec(dg, c, x.device())?), Some(Tensor::from_vec(db, c, x.device())?)))
    }
}

impl CustomOp3 for BatchNormTrain {
    fn name(&self) -> &'static str {
        "batch-norm-train"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, c, h, w) = l1.shape().dims4()?;
        let y = match s1 {
            CpuStorage::F32(_) => {
                CpuStorage::F32(self.forward_storage::<f32>((s1, l1), (s2, l2), (s3, l3), c, h * w)?)
            }
            CpuStorage::F64(_) => {
                CpuStorage::F64(self.forward_storage::<f64>((s1, l1), (s2, l2), (s3, l3), c, h * w)?)
            }
            CpuStorage::BF16(_) => {
                CpuStorage::BF16(self.forward_storage::<half::bf16>((s1, l1), (s2, l2), (s3, l3), c, h * w)?)
            }
            s => candle_core::bail!("batch norm: unsupported dtype {:?}", s.dtype()),
        };
        let shape = match self.order {
            Order::Nchw => l1.shape().clone(),
            Order::Nhwc => Shape::from((n, h, w, c)),
        };
        Ok((y, shape))
    }

    fn bwd(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        _beta: &Tensor,
        y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        // `y` and `dy` are the op's own result and its gradient: `[N, H, W, C]` for NHWC.
        let (y, dy) = &match self.order {
            Order::Nhwc => (y.permute((0, 3, 1, 2))?, dy.permute((0, 3, 1, 2))?),
            Order::Nchw => (y.clone(), dy.clone()),
        };
        match x.dtype() {
            DType::F32 => self.bwd_typed::<f32>(x, gamma, y, dy),
            DType::F64 => self.bwd_typed::<f64>(x, gamma, y, dy),
            DType::BF16 => self.bwd_typed::<half::bf16>(x, gamma, y, dy),
            d => candle_core::bail!("batch norm: unsupported dtype {d:?}"),
        }
    }
}

/// A residual block's tail, `relu(bn(z) + shortcut)`, with the batch norm in training mode, as
/// one pass that writes the block's output into a vector the caller owns (`nn::Link::tail` makes
/// it the next block's leaf without a copy). The branch `bn(z)` is never stored: it is the one
/// activation of a block that nothing needs for the backward. Its backward is [`TailSeed`].
pub fn tail_forward(op: &BatchNormTrain, z: &Tensor, gamma: &Tensor, beta: &Tensor, shortcut: &Tensor) -> Result<Var> {
    fn typed<T: Act>(
        op: &BatchNormTrain,
        (z, gamma, beta, shortcut): (&Tensor, &Tensor, &Tensor, &Tensor),
    ) -> Result<Vec<T>> {
        let (_, c, h, w) = z.dims4()?;
        with_activation_in(z, op.order, |z: &[T]| {
            with_slice(gamma, |g: &[T]| {
                with_slice(beta, |b: &[T]| {
                    with_activation_in(shortcut, op.order, |s: &[T]| op.forward_then(z, g, b, (c, h * w), Some(s)))
                })
            })
        })???
    }
    if z.shape() != shortcut.shape() || z.dtype() != shortcut.dtype() {
        candle_core::bail!("block tail: branch {:?} and shortcut {:?} differ", z.shape(), shortcut.shape());
    }
    let parts = (z, gamma, beta, shortcut);
    let (shape, order, dev) = (z.shape(), op.order, z.device());
    match z.dtype() {
        DType::F32 => leaf_from_vec(typed::<f32>(op, parts)?, shape, order, dev),
        DType::F64 => leaf_from_vec(typed::<f64>(op, parts)?, shape, order, dev),
        DType::BF16 => leaf_from_vec(typed::<half::bf16>(op, parts)?, shape, order, dev),
        d => candle_core::bail!("block tail: unsupported dtype {d:?}"),
    }
}

/// The backward of a block tail's batch norm: applied to `(z, γ, β)` it yields a scalar anchor
/// whose backward runs [`BatchNormTrain`]'s backward with the cotangent placed in `slot` (the
/// output's cotangent masked by the ReLU; the shortcut gets the same one separately). Only ever
/// part of a backward's root, where candle's own gradient is one.
#[derive(Clone, Debug)]
pub struct TailSeed {
    pub op: BatchNormTrain,
    pub slot: Arc<std::sync::Mutex<Option<Tensor>>>,
}

impl CustomOp3 for TailSeed {
    fn name(&self) -> &'static str {
        "batch-norm-tail-seed"
    }

    fn cpu_fwd(
        &self,
        _s1: &CpuStorage,
        _l1: &Layout,
        _s2: &CpuStorage,
        _l2: &Layout,
        _s3: &CpuStorage,
        _l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        // The anchor's value is never read: only its graph matters.
        Ok((CpuStorage::F32(vec![0.0]), Shape::from(())))
    }

    fn bwd(
        &self,
        z: &Tensor,
        gamma: &Tensor,
        _beta: &Tensor,
        _res: &Tensor,
        _grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dy = self
            .slot
            .lock()
            .map_err(|_| candle_core::Error::Msg("tail seed lock poisoned".into()))?
            .take()
            .ok_or_else(|| candle_core::Error::Msg("tail seed: no cotangent set".into()))?;
        // Without ReLU the op's backward never reads `y`: an empty slice stands in for it.
        let empty = Tensor::zeros(0, z.dtype(), z.device())?;
        match z.dtype() {
            DType::F32 => self.op.bwd_typed::<f32>(z, gamma, &empty, &dy),
            DType::F64 => self.op.bwd_typed::<f64>(z, gamma, &empty, &dy),
            DType::BF16 => self.op.bwd_typed::<half::bf16>(z, gamma, &empty, &dy),
            d => candle_core::bail!("batch norm: unsupported dtype {d:?}"),
        }
    }
}
