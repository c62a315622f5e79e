//! locograph's own elementwise loops give the same bits on every instruction-set level
//! (`locograph::simd`): batch norm's forward and backward (with and without its ReLU), a
//! residual link's sum and ReLU and its backward, and a block tail, in f32, f64 and bf16, on
//! plane sizes that are and are not multiples of the vector widths.
//!
//! One test in its own binary: it switches the process-wide level, which would race with other
//! tests in the same process.

use candle_core::{DType, Device, Result, Tensor, Var};
use locograph::nn::batch_norm_op::{channel_stats, BatchNormTrain};
use locograph::nn::Link;
use locograph::simd::{self, Level};
use rand::SeedableRng;
use rand_distr::{Distribution, StandardNormal};

fn randn(rng: &mut rand_chacha::ChaCha8Rng, shape: &[usize], scale: f64, shift: f64, dtype: DType) -> Result<Tensor> {
    let k: usize = shape.iter().product();
    let v: Vec<f64> = (0..k)
        .map(|_| {
            let z: f64 = StandardNormal.sample(&mut *rng);
            shift + scale * z
        })
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu)?.to_dtype(dtype)
}

/// A leaf of `t`'s values, laid out channels-last with `nhwc` (as convolutions leave them).
fn leaf(t: Tensor, nhwc: bool) -> Result<Var> {
    if nhwc {
        Var::from_tensor(&t.permute((0, 2, 3, 1))?.contiguous()?.permuted_variable((0, 3, 1, 2))?)
    } else {
        Var::from_tensor(&t)
    }
}

/// Every value the kernels produce for one dtype and shape, as f64 bits (exact for all three
/// dtypes); the activations NCHW or (`nhwc`) channels-last.
fn outputs(dtype: DType, shape: [usize; 4], nhwc: bool) -> Result<Vec<Vec<u64>>> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(shape.iter().product::<usize>() as u64);
    let c = shape[1];
    let bits = |t: &Tensor| -> Result<Vec<u64>> {
        Ok(t.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?.into_iter().map(f64::to_bits).collect())
    };
    let mut out = Vec::new();
    let x = leaf(randn(&mut rng, &shape, 3.0, 5.0, dtype)?, nhwc)?;
    let gamma = Var::from_tensor(&randn(&mut rng, &[c], 0.5, 0.7, dtype)?)?;
    let beta = Var::from_tensor(&randn(&mut rng, &[c], 1.0, 0.0, dtype)?)?;
    let proj = randn(&mut rng, &shape, 1.0, 0.0, dtype)?;
    let stats = channel_stats(x.as_tensor())?;
    out.push(stats.mean.iter().chain(&stats.var).map(|v| v.to_bits()).collect());
    for relu in [false, true] {
        let op = BatchNormTrain::new(&stats, 1e-5).with_relu(relu);
        let y = op.apply(x.as_tensor(), gamma.as_tensor(), beta.as_tensor())?;
        out.push(bits(&y)?);
        let grads = y.mul(&proj)?.sum_all()?.backward()?;
        for v in [&x, &gamma, &beta] {
            let g = grads.get(v.as_tensor()).ok_or_else(|| candle_core::Error::Msg("no gradient".into()))?;
            out.push(bits(g)?);
        }
    }
    // A residual link: relu(branch + shortcut), and its backward's cotangents.
    let branch = leaf(randn(&mut rng, &shape, 1.0, 0.0, dtype)?, nhwc)?;
    let shortcut = leaf(randn(&mut rng, &shape, 1.0, 0.2, dtype)?, nhwc)?;
    let link = Link::residual(None, branch.as_tensor().clone(), shortcut.as_tensor().clone())?;
    out.push(bits(&link.output)?);
    let grads = link.backward(proj.clone())?;
    for v in [&branch, &shortcut] {
        out.push(bits(grads.get(v.as_tensor()).ok_or_else(|| candle_core::Error::Msg("no gradient".into()))?)?);
    }
    // A block tail: relu(bn(z) + shortcut) in one pass, and its backward.
    let op = BatchNormTrain::new(&stats, 1e-5);
    let tail = Link::tail(None, x.as_tensor(), op, gamma.as_tensor(), beta.as_tensor(), shortcut.as_tensor().clone())?;
    out.push(bits(&tail.output)?);
    let grads = tail.backward(proj)?;
    for v in [&x, &gamma, &beta, &shortcut] {
        out.push(bits(grads.get(v.as_tensor()).ok_or_else(|| candle_core::Error::Msg("no gradient".into()))?)?);
    }
    Ok(out)
}

#[test]
fn every_level_gives_the_same_bits() -> Result<()> {
    let levels: Vec<Level> =
        [Level::Baseline, Level::Avx2, Level::Avx512].into_iter().filter(|l| *l <= simd::supported()).collect();
    eprintln!("comparing levels {:?} (this CPU: {:?})", levels, simd::supported());
    // 7·9 and 3·5·... are not multiples of any vector width; 65·65 spans more than one task.
    let shapes = [[3, 5, 7, 9], [2, 3, 1, 2], [2, 4, 65, 65], [16, 8, 4, 4], [4, 16, 33, 31]];
    for (dtype, nhwc) in [DType::F32, DType::F64, DType::BF16].into_iter().flat_map(|d| [(d, false), (d, true)]) {
        for shape in shapes {
            assert_eq!(simd::set_level(Level::Baseline), Level::Baseline);
            let reference = outputs(dtype, shape, nhwc)?;
            assert!(reference.iter().all(|v| !v.is_empty()));
            for &level in &levels[1..] {
                assert_eq!(simd::set_level(level), level);
                let got = outputs(dtype, shape, nhwc)?;
                for (i, (a, b)) in reference.iter().zip(&got).enumerate() {
                    let differ = a.iter().zip(b).filter(|(a, b)| a != b).count();
                    assert_eq!(
                        differ, 0,
                        "{dtype:?} {shape:?} nhwc {nhwc} output {i}: {differ} values differ on {level:?}"
                    );
                }
            }
        }
    }
    Ok(())
}
