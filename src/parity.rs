//! Checks that the distributed pieces compute, on a given group, what one process computes on
//! the whole batch. Each check builds the global batch itself (seeded), computes the one-process
//! reference in-process, computes its own rank's share through the group, and compares.
//!
//! The unit tests run them on [`crate::dist::LocalGroup`]s of 2 and 3 ranks; `locograph-dist-check`
//! (built with `--features mpi`) runs them under `mpirun`, which is how an MPI installation is
//! verified (tests/distributed.rs; docs/distributed.md).
//!
//! It lives beside `dist`, not in it: the checks compose the communicator with the loss, the
//! layers and the data loader, which themselves build on `dist`.

use std::sync::Arc;

use candle_core::{DType, Device, Tensor, Var};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};

use crate::data::{self, DataConfig, DataFormat, PairLoader, Shard};
use crate::dist::reducer::GradReducer;
use crate::dist::{Communicator, DistError};
use crate::loss::{nt_xent, nt_xent_in, Negatives};
use crate::nn::batch_norm::{batch_norm2d, BatchNorm2d};
use crate::nn::stem::{stem, StemConfig, StemKind};
use crate::nn::{Layer, ParamBuilder};

/// A check that did not hold, or could not run.
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    #[error("{check}: {detail}")]
    Failed { check: &'static str, detail: String },
    #[error(transparent)]
    Dist(#[from] DistError),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error(transparent)]
    Data(#[from] crate::data::DataError),
}

type Result<T> = std::result::Result<T, CheckError>;

/// What a passing check measured: its name and the largest relative error it saw.
#[derive(Clone, Debug, PartialEq)]
pub struct Passed {
    pub check: &'static str,
    pub max_rel_err: f64,
}

fn fail(check: &'static str, detail: String) -> CheckError {
    CheckError::Failed { check, detail }
}

fn randn(shape: &[usize], seed: u64) -> Result<Tensor> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let v: Vec<f64> = (0..shape.iter().product()).map(|_| StandardNormal.sample(&mut rng)).collect();
    Ok(Tensor::from_vec(v, shape, &Device::Cpu)?)
}

/// `max |a − b| / max(max |b|, 1e-30)` in f64.
fn rel(a: &Tensor, b: &Tensor) -> Result<f64> {
    let (a, b) = (a.to_dtype(DType::F64)?, b.to_dtype(DType::F64)?);
    if a.dims() != b.dims() {
        return Err(fail("compare", format!("shapes {:?} and {:?}", a.dims(), b.dims())));
    }
    let d = a.sub(&b)?.abs()?.max_all()?.to_scalar::<f64>()?;
    Ok(d / b.abs()?.max_all()?.to_scalar::<f64>()?.max(1e-30))
}

fn within(check: &'static str, what: &str, err: f64, tol: f64, worst: &mut f64) -> Result<()> {
    if err.is_nan() || err > tol {
        return Err(fail(check, format!("{what}: relative error {err:.3e} > {tol:.0e}")));
    }
    *worst = worst.max(err);
    Ok(())
}

/// This rank's image range of a global batch of `n`.
fn share(g: &Arc<dyn Communicator>, n: usize) -> Result<std::ops::Range<usize>> {
    Ok(Shard { rank: g.rank(), ranks: g.size() }.range(n)?)
}

/// Rows of the two views of images `r` of a `[2N, …]` batch, view 1 then view 2.
fn view_rows(t: &Tensor, n: usize, r: &std::ops::Range<usize>) -> Result<Tensor> {
    Ok(Tensor::cat(&[t.narrow(0, r.start, r.len())?, t.narrow(0, n + r.start, r.len())?], 0)?)
}

/// The collectives and point-to-point messages give the values they should, on every rank.
pub fn collectives(g: &Arc<dyn Communicator>) -> Result<Passed> {
    const C: &str = "collectives";
    let (r, n) = (g.rank(), g.size());
    let sum_ranks = (n * (n - 1) / 2) as f64;
    let mut a = vec![r as f32, 1.0, -(r as f32) * 0.5];
    g.all_reduce_sum(&mut a)?;
    if a != [sum_ranks as f32, n as f32, -(sum_ranks as f32) * 0.5] {
        return Err(fail(C, format!("all_reduce_sum f32 gave {a:?}")));
    }
    let mut b = vec![0.1f64 * r as f64; 1000];
    g.all_reduce_sum(&mut b)?;
    let want: f64 = (0..n).map(|q| 0.1 * q as f64).sum();
    if b.iter().any(|v| (v - want).abs() > 1e-12) {
        return Err(fail(C, format!("all_reduce_sum f64 gave {} not {want}", b[0])));
    }
    // Variable counts: rank q sends q + 1 copies of q.
    let (all, counts) = g.all_gather(&vec![r as u64; r + 1])?;
    let want: Vec<u64> = (0..n).flat_map(|q| vec![q as u64; q + 1]).collect();
    if all != want || counts != (1..=n).collect::<Vec<_>>() {
        return Err(fail(C, format!("all_gather gave {all:?} with counts {counts:?}")));
    }
    let root = n - 1;
    let mut c = if r == root { vec![7.5f64, -2.0] } else { vec![0.0; 2] };
    g.broadcast(&mut c, root)?;
    let mut bytes = if r == 0 { b"locograph".to_vec() } else { vec![] };
    g.broadcast_bytes(&mut bytes, 0)?;
    if c != [7.5, -2.0] || bytes != b"locograph" {
        return Err(fail(C, format!("broadcast gave {c:?}, {bytes:?}")));
    }
    g.barrier()?;
    // A ring: each rank sends to the next and receives from the previous, two tags crossed.
    if n > 1 {
        let (next, prev) = ((r + 1) % n, (r + n - 1) % n);
        g.send(&[r as f32; 3], next, 1)?;
        g.send(&[10.0 + r as f32], next, 2)?;
        let (mut x, mut y) = ([0f32; 1], [0f32; 3]);
        g.recv(&mut x, prev, 2)?;
        g.recv(&mut y, prev, 1)?;
        if x != [10.0 + prev as f32] || y != [prev as f32; 3] {
            return Err(fail(C, format!("ring from rank {prev} gave {x:?} {y:?}")));
        }
    }
    let dup = g.duplicate()?;
    let mut d = [1u64];
    dup.all_reduce_sum(&mut d)?;
    if d[0] != n as u64 || dup.rank() != r {
        return Err(fail(C, format!("duplicate: sum {} rank {}", d[0], dup.rank())));
    }
    Ok(Passed { check: C, max_rel_err: 0.0 })
}

/// NT-Xent across ranks against one process (f64, ≤ 1e-10): projections `z = x·W` of a global
/// batch of `images` (uneven shares when the ranks do not divide it) through a weight `W` every
/// rank holds. Global negatives: the loss equals one process's on the whole batch, each rank's
/// `dx` is `size ×` its rows of one process's, and the mean over ranks of `dW` is one process's.
/// Local negatives: the same against one process that computes each rank's share alone, and a
/// loss that differs from the global one.
pub fn nt_xent_parity(g: &Arc<dyn Communicator>, negatives: Negatives, images: usize) -> Result<Passed> {
    const C: &str = "nt_xent";
    let (dim, tau) = (6, 0.3);
    let x = randn(&[2 * images, dim], 11)?;
    let w = randn(&[dim, dim], 12)?;
    let mine = share(g, images)?;
    let size = g.size() as f64;

    // One process: the loss and gradients of the whole batch.
    let (xv, wv) = (Var::from_tensor(&x)?, Var::from_tensor(&w)?);
    let reference = match negatives {
        Negatives::Global => nt_xent(&xv.as_tensor().matmul(wv.as_tensor())?, tau)?,
        Negatives::Local => {
            // Each rank's anchors with its own rows only, weighted by its anchors' count.
            let mut total = Tensor::zeros((), DType::F64, &Device::Cpu)?;
            for q in 0..g.size() {
                let r = Shard { rank: q, ranks: g.size() }.range(images)?;
                let zq = view_rows(xv.as_tensor(), images, &r)?.matmul(wv.as_tensor())?;
                total = (total + nt_xent(&zq, tau)?.affine(r.len() as f64 / images as f64, 0.0)?)?;
            }
            total
        }
    };
    let ref_grads = reference.backward()?;
    let (ref_dx, ref_dw) = (
        ref_grads.get(xv.as_tensor()).ok_or_else(|| fail(C, "no reference dx".into()))?.clone(),
        ref_grads.get(wv.as_tensor()).ok_or_else(|| fail(C, "no reference dW".into()))?.clone(),
    );

    // This rank: its rows, the same W.
    let xr = Var::from_tensor(&view_rows(&x, images, &mine)?)?;
    let wr = Var::from_tensor(&w)?;
    let loss = nt_xent_in(&xr.as_tensor().matmul(wr.as_tensor())?, tau, negatives, g)?;
    let grads = loss.backward()?;
    let dx = grads.get(xr.as_tensor()).ok_or_else(|| fail(C, "no dx".into()))?;
    let mut dw = grads.get(wr.as_tensor()).ok_or_else(|| fail(C, "no dW".into()))?.flatten_all()?.to_vec1::<f64>()?;
    g.all_reduce_sum(&mut dw)?;
    let mean_dw = Tensor::from_vec(dw.iter().map(|v| v / size).collect::<Vec<_>>(), (dim, dim), &Device::Cpu)?;

    let mut worst: f64 = 0.0;
    let (got, want) = (loss.to_scalar::<f64>()?, reference.to_scalar::<f64>()?);
    within(C, "loss", (got - want).abs() / want.abs(), 1e-10, &mut worst)?;
    within(C, "dx", rel(dx, &(view_rows(&ref_dx, images, &mine)? * size)?)?, 1e-10, &mut worst)?;
    within(C, "mean dW", rel(&mean_dw, &ref_dw)?, 1e-10, &mut worst)?;
    if negatives == Negatives::Local && g.size() > 1 {
        let global = nt_xent(&x.matmul(&w)?, tau)?.to_scalar::<f64>()?;
        if (global - got).abs() < 1e-3 {
            return Err(fail(C, format!("local negatives gave {got}, the global loss is {global}: no difference")));
        }
    }
    Ok(Passed { check: C, max_rel_err: worst })
}

/// Synchronised batch norm against one process's on the global batch (f64, ≤ 1e-10): the
/// plain op (with and without its ReLU, and the composed candle ops), the block tail's backward
/// and the ImageNet stem (conv, batch norm, ReLU, max pool as one op). Outputs and `dx` equal
/// one process's rows, the ranks' parameter gradients sum to one process's, the running
/// statistics are equal.
pub fn batch_norm_parity(g: &Arc<dyn Communicator>, images: usize) -> Result<Passed> {
    let (c, h, w) = (3, 4, 5);
    let case = BnCase {
        g,
        mine: share(g, images)?,
        x: randn(&[images, c, h, w], 21)?.affine(2.0, 1.5)?,
        proj: randn(&[images, c, h, w], 22)?,
    };
    let mut worst: f64 = 0.0;
    bn_variants(&case, &mut worst)?;
    bn_tail(&case, &mut worst)?;
    bn_stem(&case, &mut worst)?;
    Ok(Passed { check: BN, max_rel_err: worst })
}

const BN: &str = "batch_norm";

/// What every batch norm check shares: the whole batch `x` (3 channels) and the projection
/// that makes a scalar of the output, this rank's rows of them, and the sum over the ranks
/// that turns this rank's parameter gradients into the whole batch's.
struct BnCase<'g> {
    g: &'g Arc<dyn Communicator>,
    mine: std::ops::Range<usize>,
    x: Tensor,
    proj: Tensor,
}

impl BnCase<'_> {
    fn rows(&self, t: &Tensor) -> Result<Tensor> {
        Ok(t.narrow(0, self.mine.start, self.mine.len())?)
    }

    fn summed(&self, t: &Tensor) -> Result<Tensor> {
        let mut v = t.flatten_all()?.to_vec1::<f64>()?;
        self.g.all_reduce_sum(&mut v)?;
        Ok(Tensor::from_vec(v, t.shape(), &Device::Cpu)?)
    }

    /// A batch norm over the whole batch on one process and a synchronised one over the ranks
    /// (parameters seeded from `seed`), with the same non-trivial γ, β when `affine`.
    fn pair(&self, seed: u64, affine: bool) -> Result<(BatchNorm2d, BatchNorm2d)> {
        let c = self.x.dims()[1];
        let one = ParamBuilder::new(seed, &Device::Cpu, DType::F64);
        let many = ParamBuilder::new(seed, &Device::Cpu, DType::F64).sync_batch_norm(self.g.clone());
        let pair = (batch_norm2d(c, false, &one)?, batch_norm2d(c, false, &many)?);
        if affine {
            for store in [one.store(), many.store()] {
                for p in store.params {
                    let seed = if p.name.ends_with("weight") { 23 } else { 24 };
                    p.var.set(&randn(&[c], seed)?)?;
                }
            }
        }
        Ok(pair)
    }
}

fn gradient(gs: &candle_core::backprop::GradStore, t: &Tensor, what: &str) -> Result<Tensor> {
    gs.get(t).cloned().ok_or_else(|| fail(BN, format!("no gradient for {what}")))
}

/// The fused batch norm (with and without its ReLU) and the composed one: output, input
/// gradient, γ and β gradients and running statistics agree between one process and the ranks.
fn bn_variants(case: &BnCase, worst: &mut f64) -> Result<()> {
    let (xr, pr) = (case.rows(&case.x)?, case.rows(&case.proj)?);
    for (variant, relu, composed) in [("fused", false, false), ("fused+relu", true, false), ("composed", false, true)] {
        let (bn1, bnr) = case.pair(3, true)?;
        let (x1, x2) = (Var::from_tensor(&case.x)?, Var::from_tensor(&xr)?);
        let f = |bn: &BatchNorm2d, x: &Tensor| match (composed, relu) {
            (true, _) => bn.train_composed(x),
            (false, true) => bn.forward_relu_t(x, true),
            (false, false) => bn.forward_t(x, true),
        };
        let (y1, y2) = (f(&bn1, x1.as_tensor())?, f(&bnr, x2.as_tensor())?);
        let g1 = y1.mul(&case.proj)?.sum_all()?.backward()?;
        let g2 = y2.mul(&pr)?.sum_all()?.backward()?;
        let at = |what: &str| format!("{variant} {what}");
        within(BN, &at("y"), rel(&y2, &case.rows(&y1)?)?, 1e-10, worst)?;
        let (dx1, dx2) = (gradient(&g1, x1.as_tensor(), &at("x"))?, gradient(&g2, x2.as_tensor(), &at("x"))?);
        within(BN, &at("dx"), rel(&dx2, &case.rows(&dx1)?)?, 1e-10, worst)?;
        for (what, t1, t2) in [("γ", bn1.weight(), bnr.weight()), ("β", bn1.bias(), bnr.bias())] {
            let (d1, d2) = (gradient(&g1, t1, &at(what))?, gradient(&g2, t2, &at(what))?);
            within(BN, &at(&format!("d{what}")), rel(&case.summed(&d2)?, &d1)?, 1e-10, worst)?;
        }
        within(BN, &at("running mean"), rel(bnr.running_mean(), bn1.running_mean())?, 1e-10, worst)?;
        within(BN, &at("running var"), rel(bnr.running_var(), bn1.running_var())?, 1e-10, worst)?;
    }
    Ok(())
}

/// The block tail's backward (`TailSeed`): the cotangent of bn(z) placed in its slot.
fn bn_tail(case: &BnCase, worst: &mut f64) -> Result<()> {
    use crate::nn::batch_norm_op::TailSeed;
    let (bn1, bnr) = case.pair(4, false)?;
    let (z1, z2) = (Var::from_tensor(&case.x)?, Var::from_tensor(&case.rows(&case.x)?)?);
    let seeded = |bn: &BatchNorm2d, z: &Tensor, cot: &Tensor| -> Result<_> {
        let op = bn.fused_train_op(z)?.ok_or_else(|| fail(BN, "no fused op on CPU f64".into()))?;
        let slot = Arc::new(std::sync::Mutex::new(Some(cot.clone())));
        Ok(z.apply_op3(bn.weight(), bn.bias(), TailSeed { op, slot })?.backward()?)
    };
    let g1 = seeded(&bn1, z1.as_tensor(), &case.proj)?;
    let g2 = seeded(&bnr, z2.as_tensor(), &case.rows(&case.proj)?)?;
    let (dz1, dz2) = (gradient(&g1, z1.as_tensor(), "tail z")?, gradient(&g2, z2.as_tensor(), "tail z")?);
    within(BN, "tail dz", rel(&dz2, &case.rows(&dz1)?)?, 1e-10, worst)?;
    for (what, t1, t2) in [("γ", bn1.weight(), bnr.weight()), ("β", bn1.bias(), bnr.bias())] {
        let (d1, d2) = (gradient(&g1, t1, what)?, gradient(&g2, t2, what)?);
        within(BN, &format!("tail d{what}"), rel(&case.summed(&d2)?, &d1)?, 1e-10, worst)?;
    }
    Ok(())
}

/// The ImageNet stem: conv, then batch norm + ReLU + max pool as one op.
fn bn_stem(case: &BnCase, worst: &mut f64) -> Result<()> {
    let cfg = StemConfig { kind: StemKind::Imagenet, channels: 4, frozen: false };
    let img = randn(&[case.x.dims()[0], 2, 9, 9], 25)?;
    let one = ParamBuilder::new(5, &Device::Cpu, DType::F64);
    let many = ParamBuilder::new(5, &Device::Cpu, DType::F64).sync_batch_norm(case.g.clone());
    let (s1, sr) = (stem(&cfg, 2, &one)?, stem(&cfg, 2, &many)?);
    let y1 = s1.forward_t(&img, true)?;
    let y2 = sr.forward_t(&case.rows(&img)?, true)?;
    let p = randn(y1.dims(), 26)?;
    let g1 = y1.mul(&p)?.sum_all()?.backward()?;
    let g2 = y2.mul(&case.rows(&p)?)?.sum_all()?.backward()?;
    within(BN, "stem y", rel(&y2, &case.rows(&y1)?)?, 1e-10, worst)?;
    for (a, b) in one.store().params.iter().zip(&many.store().params) {
        let what = format!("stem {}", a.name);
        let (ga, gb) = (gradient(&g1, a.var.as_tensor(), &what)?, gradient(&g2, b.var.as_tensor(), &what)?);
        within(BN, &format!("stem d{}", a.name), rel(&case.summed(&gb)?, &ga)?, 1e-10, worst)?;
    }
    within(BN, "stem running var", rel(sr.bn().running_var(), s1.bn().running_var())?, 1e-10, worst)?;
    Ok(())
}

/// The gradient reducer's result is the exact mean of the ranks' gradients (integer-valued f32,
/// whose sums are exact), for buckets smaller and larger than a node, in push order; and within
/// 1e-6 of the f64 mean for random values.
pub fn reducer_mean(g: &Arc<dyn Communicator>) -> Result<Passed> {
    const C: &str = "reducer";
    let (r, n) = (g.rank(), g.size());
    let shapes: [&[usize]; 4] = [&[3, 4], &[7], &[2, 2, 5], &[1]];
    let value = |q: usize, p: usize, i: usize, exact: bool| -> f32 {
        if exact {
            ((q + 1) * (p + 2) * n + i) as f32
        } else {
            (((q * 31 + p * 7 + i) as f32) * 0.618).sin() * 1.7
        }
    };
    let mut worst: f64 = 0.0;
    for exact in [true, false] {
        for bucket_bytes in [16, 100, 1 << 20] {
            let mut red = GradReducer::new(g, bucket_bytes)?;
            let mut back = vec![];
            for (p, shape) in shapes.iter().enumerate() {
                let len: usize = shape.iter().product();
                let v: Vec<f32> = (0..len).map(|i| value(r, p, i, exact)).collect();
                red.push(p, vec![(p, Tensor::from_vec(v, *shape, &Device::Cpu)?)])?;
                back.extend(red.ready()?);
            }
            back.extend(red.finish()?);
            let keys: Vec<usize> = back.iter().map(|b| b.key).collect();
            if keys != [0, 1, 2, 3] {
                return Err(fail(C, format!("nodes came back in order {keys:?}")));
            }
            for b in back {
                let p = b.key;
                let got = b.grads[0].1.flatten_all()?.to_vec1::<f32>()?;
                for (i, v) in got.iter().enumerate() {
                    let mean = (0..n).map(|q| value(q, p, i, exact) as f64).sum::<f64>() / n as f64;
                    let err = (*v as f64 - mean).abs() / mean.abs().max(1.0);
                    if exact && err != 0.0 {
                        return Err(fail(C, format!("param {p}[{i}] = {v}, the mean is {mean}")));
                    }
                    within(C, "random mean", err, 1e-6, &mut worst)?;
                }
            }
        }
    }
    Ok(Passed { check: C, max_rel_err: worst })
}

/// Each rank's sharded batch is its share of one process's batch, view for view, bit for bit
/// (synthetic images, SimCLR augmentations, two epochs).
pub fn shard_parity(g: &Arc<dyn Communicator>, images: usize) -> Result<Passed> {
    const C: &str = "shard";
    let mut cfg = DataConfig::new(DataFormat::Synthetic, None);
    cfg.synthetic.train_size = 4 * images + 1;
    cfg.synthetic.side = 12;
    cfg.augment.size = Some(10);
    cfg.workers = 1;
    let ds = data::open(&cfg, std::path::Path::new("."), None)?;
    let shard = Shard { rank: g.rank(), ranks: g.size() };
    let mine = shard.range(images)?;
    for epoch in 0..2 {
        let whole = PairLoader::new(ds.clone(), &cfg, images, 9, epoch);
        let part = PairLoader::sharded(ds.clone(), &cfg, images, 9, epoch, shard);
        let mut batches = 0;
        for (a, b) in whole.zip(part) {
            let (a, b) = (a?, b?);
            let size: usize = a.shape[1..].iter().product();
            let rows_of = |v: usize| &a.data[(v * images + mine.start) * size..(v * images + mine.end) * size];
            let want: Vec<f32> = [rows_of(0), rows_of(1)].concat();
            if b.data != want || b.indices != a.indices[mine.clone()] || b.shape[0] != 2 * mine.len() {
                return Err(fail(
                    C,
                    format!("epoch {epoch} batch {batches}: rank {} differs from its share", g.rank()),
                ));
            }
            batches += 1;
        }
        if batches != 4 {
            return Err(fail(C, format!("epoch {epoch}: {batches} batches, expected 4")));
        }
    }
    Ok(Passed { check: C, max_rel_err: 0.0 })
}

/// Every check, in order, with the batch sizes the tests use (`images` not divisible by 2 or 3
/// makes the shares uneven).
pub fn all(g: &Arc<dyn Communicator>, images: usize) -> Result<Vec<Passed>> {
    Ok(vec![
        collectives(g)?,
        nt_xent_parity(g, Negatives::Global, images)?,
        nt_xent_parity(g, Negatives::Local, images)?,
        batch_norm_parity(g, images)?,
        reducer_mean(g)?,
        shard_parity(g, images)?,
    ])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dist::{solo, LocalGroup};

    fn on(ranks: usize, images: usize) {
        for (rank, res) in LocalGroup::run(ranks, |g| all(&g, images)).into_iter().enumerate() {
            let passed = res.unwrap_or_else(|e| panic!("{ranks} ranks, rank {rank}: {e}"));
            assert_eq!(passed.len(), 6);
        }
    }

    #[test]
    fn one_process_is_its_own_reference() {
        all(&solo(), 5).unwrap_or_else(|e| panic!("{e}"));
    }

    #[test]
    fn two_ranks_even_and_uneven_shares() {
        on(2, 6);
        on(2, 7);
    }

    #[test]
    fn three_ranks_uneven_shares() {
        on(3, 7);
    }

    /// The checks can fail: a rank whose batch norm does not synchronise is caught.
    #[test]
    fn an_unsynchronised_batch_norm_is_caught() {
        let out = LocalGroup::run(2, |g| {
            // Every rank normalises its own share: the group is one process each.
            let own = solo();
            let images = 6;
            let x = randn(&[images, 3, 2, 2], 1)?;
            let mine = share(&g, images)?;
            let one = ParamBuilder::new(3, &Device::Cpu, DType::F64);
            let alone = ParamBuilder::new(3, &Device::Cpu, DType::F64).sync_batch_norm(own);
            let y1 = batch_norm2d(3, false, &one)?.forward_t(&x, true)?;
            let y2 = batch_norm2d(3, false, &alone)?.forward_t(&x.narrow(0, mine.start, mine.len())?, true)?;
            rel(&y2, &y1.narrow(0, mine.start, mine.len())?)
        });
        for r in out {
            assert!(r.expect("ran") > 1e-3, "a rank's own statistics differ from the batch's");
        }
    }
}
