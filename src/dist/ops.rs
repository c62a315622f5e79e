//! Collectives as differentiable candle ops (CPU, f32/f64).
//!
//! - [`all_gather_views`]: the rows of every rank, laid out as one process would have them;
//!   backward: the gradient of the gathered rows is summed over the ranks and each rank keeps
//!   the rows it owns. NT-Xent's global negatives.
//! - [`all_reduce_sum`]: `y = Σ_r x_r` on every rank; backward: the cotangents summed over the
//!   ranks (every rank's loss depends on `y`). Synchronised batch norm's statistics on the
//!   composed path.
//!
//! Both must be run by every rank at the same point of the same graph, forward and backward:
//! the engine runs the same schedule everywhere, and candle walks one graph in one order.

use std::sync::Arc;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor, WithDType};

use super::{Communicator, Element};
use crate::nn::cpu_slice::{storage_slice, with_slice};

fn wrap(e: super::DistError) -> candle_core::Error {
    candle_core::Error::wrap(e)
}

/// Rows of every rank, view-major: see [`all_gather_views`].
struct GatherViews {
    group: Arc<dyn Communicator>,
    views: usize,
    /// Images per rank (each contributes `views` rows of each).
    counts: Vec<usize>,
}

impl GatherViews {
    fn offset(&self) -> usize {
        self.counts[..self.group.rank()].iter().sum()
    }

    fn total(&self) -> usize {
        self.counts.iter().sum()
    }

    /// Local rows `[views·n_r, D]` → global `[views·N, D]`: row `v·N + off_r + j` is rank `r`'s
    /// row `v·n_r + j`.
    fn forward<T: WithDType + Element>(&self, x: &[T], dim: usize) -> Result<Vec<T>> {
        let (mine, counts) = self.group.all_gather(x).map_err(wrap)?;
        let n = self.total();
        let mut out = vec![T::zero(); self.views * n * dim];
        let (mut from, mut off) = (0, 0);
        for (r, &c) in counts.iter().enumerate() {
            if c != self.views * self.counts[r] * dim {
                candle_core::bail!(
                    "all_gather_views: rank {r} sent {c} values, expected {}",
                    self.views * self.counts[r] * dim
                );
            }
            let nr = self.counts[r];
            for v in 0..self.views {
                let src = &mine[from + v * nr * dim..][..nr * dim];
                out[(v * n + off) * dim..][..nr * dim].copy_from_slice(src);
            }
            from += c;
            off += nr;
        }
        Ok(out)
    }

    /// Gradient of the global rows → summed over the ranks → this rank's rows.
    fn backward<T: WithDType + Element>(&self, g: &[T], dim: usize) -> Result<Vec<T>> {
        let mut sum = g.to_vec();
        self.group.all_reduce_sum(&mut sum).map_err(wrap)?;
        let (n, off, nr) = (self.total(), self.offset(), self.counts[self.group.rank()]);
        let mut out = Vec::with_capacity(self.views * nr * dim);
        for v in 0..self.views {
            out.extend_from_slice(&sum[(v * n + off) * dim..][..nr * dim]);
        }
        Ok(out)
    }
}

impl CustomOp1 for GatherViews {
    fn name(&self) -> &'static str {
        "all-gather-views"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (_, dim) = l.shape().dims2()?;
        let out = match s {
            CpuStorage::F32(_) => CpuStorage::F32(self.forward(&storage_slice::<f32>(s, l)?, dim)?),
            CpuStorage::F64(_) => CpuStorage::F64(self.forward(&storage_slice::<f64>(s, l)?, dim)?),
            s => candle_core::bail!("all_gather_views: unsupported dtype {:?}", s.dtype()),
        };
        Ok((out, Shape::from((self.views * self.total(), dim))))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let (_, dim) = arg.dims2()?;
        let g = match grad_res.dtype() {
            DType::F32 => {
                Tensor::from_vec(with_slice(grad_res, |g: &[f32]| self.backward(g, dim))??, arg.shape(), arg.device())?
            }
            DType::F64 => {
                Tensor::from_vec(with_slice(grad_res, |g: &[f64]| self.backward(g, dim))??, arg.shape(), arg.device())?
            }
            d => candle_core::bail!("all_gather_views: unsupported dtype {d:?}"),
        };
        Ok(Some(g))
    }
}

/// Every rank's rows, in the order one process would hold the whole batch.
///
/// `x` holds `views` blocks of this rank's `n_r` images (`[views·n_r, D]`, view-major, as a
/// [`crate::data::Batch`] lays out its views); the result holds `views` blocks of all `N = Σ n_r`
/// images, each block in rank order: view `v` of rank `r`'s image `j` is row `v·N + off_r + j`,
/// `off_r = Σ_{q<r} n_q`. Also returns `(n_r for each rank)`. One rank: `x` itself.
///
/// # Shapes
/// `[views·n_r, D]` → `[views·N, D]`.
pub fn all_gather_views(x: &Tensor, views: usize, group: &Arc<dyn Communicator>) -> Result<(Tensor, Vec<usize>)> {
    let (rows, _) = x.dims2()?;
    if views == 0 || rows % views != 0 {
        candle_core::bail!("all_gather_views: {rows} rows are not {views} views of the same images");
    }
    let counts = group.all_gather_counts(rows / views).map_err(wrap)?;
    if group.size() == 1 {
        return Ok((x.clone(), counts));
    }
    let op = GatherViews { group: group.clone(), views, counts: counts.clone() };
    Ok((x.apply_op1(op)?, counts))
}

/// `Σ_r x_r`, differentiable: see [`all_reduce_sum`].
struct ReduceSum(Arc<dyn Communicator>);

impl ReduceSum {
    fn sum_tensor(&self, t: &Tensor) -> Result<Tensor> {
        fn typed<T: WithDType + Element>(g: &Arc<dyn Communicator>, t: &Tensor) -> Result<Tensor> {
            let mut v = with_slice(t, |s: &[T]| s.to_vec())?;
            g.all_reduce_sum(&mut v).map_err(wrap)?;
            Tensor::from_vec(v, t.shape(), t.device())
        }
        match t.dtype() {
            DType::F32 => typed::<f32>(&self.0, t),
            DType::F64 => typed::<f64>(&self.0, t),
            d => candle_core::bail!("all_reduce_sum: unsupported dtype {d:?}"),
        }
    }
}

impl CustomOp1 for ReduceSum {
    fn name(&self) -> &'static str {
        "all-reduce-sum"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        fn typed<T: WithDType + Element>(g: &Arc<dyn Communicator>, s: &CpuStorage, l: &Layout) -> Result<Vec<T>> {
            let mut v = storage_slice::<T>(s, l)?.into_owned();
            g.all_reduce_sum(&mut v).map_err(wrap)?;
            Ok(v)
        }
        let out = match s {
            CpuStorage::F32(_) => CpuStorage::F32(typed(&self.0, s, l)?),
            CpuStorage::F64(_) => CpuStorage::F64(typed(&self.0, s, l)?),
            s => candle_core::bail!("all_reduce_sum: unsupported dtype {:?}", s.dtype()),
        };
        Ok((out, l.shape().clone()))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(self.sum_tensor(grad_res)?))
    }
}

/// `Σ_r x_r` on every rank (same shape everywhere); the backward sums the ranks' cotangents.
/// One rank: `x` itself.
pub fn all_reduce_sum(x: &Tensor, group: &Arc<dyn Communicator>) -> Result<Tensor> {
    if group.size() == 1 {
        return Ok(x.clone());
    }
    x.apply_op1(ReduceSum(group.clone()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dist::LocalGroup;
    use candle_core::{Device, Var};

    /// Three ranks with 1, 2 and 3 images of two views: the gathered rows are the rows one
    /// process would stack, and the backward of `Σ w ⊙ gathered` (each rank its own `w`) gives
    /// each rank `Σ_r w_r` at its own rows.
    #[test]
    fn gather_views_orders_rows_like_one_process_and_sums_gradients() {
        let dim = 2;
        let counts = [1usize, 2, 3];
        let n: usize = counts.iter().sum();
        // Image `i` (global), view `v`, feature `k`: 100·v + 10·i + k.
        let value = |v: usize, i: usize, k: usize| (100 * v + 10 * i + k) as f64;
        let out = LocalGroup::run(3, |g| -> Result<(Vec<f64>, Vec<f64>)> {
            let r = g.rank();
            let off: usize = counts[..r].iter().sum();
            let local: Vec<f64> = (0..2)
                .flat_map(|v| (0..counts[r]).flat_map(move |j| (0..dim).map(move |k| value(v, off + j, k))))
                .collect();
            let x = Var::from_vec(local, (2 * counts[r], dim), &Device::Cpu)?;
            let (all, got_counts) = all_gather_views(x.as_tensor(), 2, &g)?;
            assert_eq!(got_counts, counts);
            let w = Tensor::full((r + 1) as f64, (2 * n, dim), &Device::Cpu)?;
            let grads = all.mul(&w)?.sum_all()?.backward()?;
            let gx = grads.get(x.as_tensor()).expect("gradient of the local rows");
            Ok((all.flatten_all()?.to_vec1()?, gx.flatten_all()?.to_vec1()?))
        });
        let want: Vec<f64> =
            (0..2).flat_map(|v| (0..n).flat_map(move |i| (0..dim).map(move |k| value(v, i, k)))).collect();
        for (r, res) in out.into_iter().enumerate() {
            let (all, gx) = res.expect("rank ran");
            assert_eq!(all, want, "rank {r}");
            assert_eq!(gx, vec![6.0; 2 * counts[r] * dim], "rank {r}: 1 + 2 + 3 at every own row");
        }
    }

    #[test]
    fn all_reduce_sum_forward_and_backward() {
        let out = LocalGroup::run(2, |g| -> Result<(Vec<f32>, Vec<f32>)> {
            let r = g.rank() as f32;
            let x = Var::from_vec(vec![r, 2.0 * r + 1.0], 2, &Device::Cpu)?;
            let y = all_reduce_sum(x.as_tensor(), &g)?;
            let cot = Tensor::new(&[1.0f32 + r, 10.0], &Device::Cpu)?;
            let grads = y.mul(&cot)?.sum_all()?.backward()?;
            Ok((y.to_vec1()?, grads.get(x.as_tensor()).expect("dx").to_vec1()?))
        });
        for res in out {
            let (y, dx) = res.expect("rank ran");
            assert_eq!(y, vec![1.0, 4.0]);
            assert_eq!(dx, vec![3.0, 20.0]);
        }
    }
}
