//! The vendored candle-core's changes to `Tensor::backward` (vendor/candle-core/LOCOGRAPH-PATCH.md):
//! gradients that meet are summed in place only where no one else can see the stored one, and
//! `backward_owned` gives the same gradients as `backward` while freeing the graph as it goes.
//! Each case is checked against its gradient worked out by hand, in f32 and f64.

use candle_core::{DType, Device, Result, Tensor, Var};

fn close(a: &Tensor, b: &Tensor) -> Result<()> {
    let d = a.sub(b)?.abs()?.flatten_all()?.max(0)?.to_dtype(DType::F64)?.to_scalar::<f64>()?;
    assert!(d < 1e-6, "{a} vs {b}");
    Ok(())
}

fn var(values: &[f64], dtype: DType) -> Result<Var> {
    Var::from_tensor(&Tensor::new(values, &Device::Cpu)?.to_dtype(dtype)?)
}

/// `x·a + x·b`: two fresh gradients meet at `x` (the second is added in place).
#[test]
fn two_paths_into_one_tensor_sum() -> Result<()> {
    for dtype in [DType::F32, DType::F64] {
        let x = var(&[1.0, -2.0, 3.0], dtype)?;
        let a = Tensor::new(&[0.5, 4.0, -1.0], &Device::Cpu)?.to_dtype(dtype)?;
        let b = Tensor::new(&[2.0, -3.0, 0.25], &Device::Cpu)?.to_dtype(dtype)?;
        let y = (x.as_tensor().mul(&a)? + x.as_tensor().mul(&b)?)?.sum_all()?;
        let g = y.backward()?;
        close(g.get(x.as_tensor()).expect("dx"), &(&a + &b)?)?;
    }
    Ok(())
}

/// `h + h` with `h = exp(x)`: the *same* gradient tensor reaches `h` twice, so the stored one
/// is shared when the second arrives and must not be added into (that would give 4·exp(x)).
#[test]
fn a_shared_gradient_is_not_summed_in_place() -> Result<()> {
    for dtype in [DType::F32, DType::F64] {
        let x = var(&[0.0, 1.0, -1.0], dtype)?;
        let h = x.as_tensor().exp()?;
        let g = (&h + &h)?.sum_all()?.backward()?;
        close(g.get(x.as_tensor()).expect("dx"), &(h.detach() * 2.0)?)?;
        // Three uses: the in-place sum may apply from the third term on, still 3·exp(x).
        let g = ((&h + &h)? + &h)?.sum_all()?.backward()?;
        close(g.get(x.as_tensor()).expect("dx"), &(h.detach() * 3.0)?)?;
    }
    Ok(())
}

/// A gradient that is a view of a tensor kept elsewhere (`narrow` of a concatenation) must not
/// be changed in place either.
#[test]
fn gradients_through_views_and_reuse() -> Result<()> {
    for dtype in [DType::F32, DType::F64] {
        let x = var(&[1.0, 2.0, 3.0, 4.0], dtype)?;
        let t = x.as_tensor();
        // y = Σ (x[0..2]² ) + Σ x·x[..] over a concatenation that reuses x: dy/dx = 2x + 2x.
        let c = Tensor::cat(&[t, t], 0)?;
        let y = (c.narrow(0, 0, 4)?.sqr()?.sum_all()? + c.narrow(0, 4, 4)?.sqr()?.sum_all()?)?;
        let g = y.backward()?;
        close(g.get(t).expect("dx"), &(t.detach() * 4.0)?)?;
    }
    Ok(())
}

/// `backward_owned` on a root no one else holds gives exactly `backward`'s gradients.
#[test]
fn backward_owned_equals_backward() -> Result<()> {
    for dtype in [DType::F32, DType::F64] {
        let x = var(&[0.3, -1.2, 2.0, 0.7], dtype)?;
        let w = var(&[1.5, -0.5, 0.25, 2.0], dtype)?;
        let build = || -> Result<Tensor> {
            let h = x.as_tensor().mul(w.as_tensor())?.tanh()?;
            (h.sqr()? + h.mul(x.as_tensor())?)?.sum_all()
        };
        let want = build()?.backward()?;
        let got = build()?.backward_owned()?;
        for v in [&x, &w] {
            let (a, b) = (got.get(v.as_tensor()).expect("grad"), want.get(v.as_tensor()).expect("grad"));
            assert_eq!(a.sub(b)?.abs()?.flatten_all()?.max(0)?.to_dtype(DType::F64)?.to_scalar::<f64>()?, 0.0);
        }
    }
    Ok(())
}

/// A channels-last leaf (`permuted_variable`: an NHWC buffer seen as NCHW, no copy) used twice:
/// both gradients keep the leaf's layout (`accumulate` stores a gradient laid out like its
/// tensor as it is) and the second is added in place over the same permuted layout. Against the
/// same computation on a contiguous leaf.
#[test]
fn channels_last_leaf_gradients_keep_their_layout() -> Result<()> {
    for dtype in [DType::F32, DType::F64] {
        let vals: Vec<f64> = (0..2 * 3 * 2 * 4).map(|i| ((i * 5 % 7) as f64 - 3.0) / 2.0).collect();
        let nchw = Tensor::from_vec(vals, (2, 3, 2, 4), &Device::Cpu)?.to_dtype(dtype)?;
        let raw = nchw.permute((0, 2, 3, 1))?.contiguous()?;
        let leaf = Var::from_tensor(&raw.permuted_variable((0, 3, 1, 2))?)?;
        assert!(leaf.as_tensor().is_variable() && !leaf.as_tensor().is_contiguous() && leaf.as_tensor().is_dense());
        close(&leaf.as_tensor().flatten_all()?, &nchw.flatten_all()?)?;
        // Two uses whose gradients come back as permuted views of contiguous NHWC tensors.
        let twice = |t: &Tensor| -> Result<Tensor> {
            let a = t.permute((0, 2, 3, 1))?.contiguous()?.sqr()?.permute((0, 3, 1, 2))?;
            let b = t.permute((0, 2, 3, 1))?.contiguous()?.exp()?.permute((0, 3, 1, 2))?;
            (a + b)?.sum_all()
        };
        let got = twice(leaf.as_tensor())?.backward()?;
        let plain = Var::from_tensor(&nchw)?;
        let want = twice(plain.as_tensor())?.backward()?;
        let g = got.get(leaf.as_tensor()).expect("dx");
        assert_eq!(g.stride(), leaf.as_tensor().stride(), "the gradient keeps the leaf's layout");
        close(&g.flatten_all()?, &want.get(plain.as_tensor()).expect("dx").flatten_all()?)?;
    }
    Ok(())
}

/// The in-place sum of two bf16 gradients (bit arithmetic, so that it vectorises) gives
/// exactly `half::bf16`'s `a + b`, the sum of a new tensor: over spread-out bit patterns and
/// the cases rounding turns on (ties to even, carries into the exponent, overflow to infinity,
/// subnormals, signed zeros, infinities, NaN).
#[test]
fn bf16_gradients_sum_in_place_as_half_adds() -> Result<()> {
    use half::bf16;
    let mut state = 0x2545_f491_u32;
    let mut bits = || {
        state ^= state << 13;
        state ^= state >> 17;
        state ^= state << 5;
        state as u16
    };
    let special: [u16; 14] = [
        0x0000, 0x8000, 0x0001, 0x807f, 0x3f80, 0x3f81, 0x7f7f, 0xff7f, 0x7f80, 0xff80, 0x7fc0, 0x7f81, 0x4000, 0xc000,
    ];
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for &x in &special {
        for &y in &special {
            a.push(bf16::from_bits(x));
            b.push(bf16::from_bits(y));
        }
    }
    for _ in 0..20_000 {
        // Exponents close together, so that the sums round (not one operand swallowing the other).
        let x = bits();
        a.push(bf16::from_bits(x));
        b.push(bf16::from_bits((bits() & 0x80ff) | (x & 0x7f00)));
    }
    let n = a.len();
    let (ta, tb) = (Tensor::from_vec(a.clone(), n, &Device::Cpu)?, Tensor::from_vec(b.clone(), n, &Device::Cpu)?);
    // y = Σ x·a + Σ x·b at x = 1: the gradients a and b meet at x, the second added in place.
    let x = Var::from_tensor(&Tensor::ones(n, DType::BF16, &Device::Cpu)?)?;
    let y = (x.as_tensor().mul(&ta)?.sum_all()? + x.as_tensor().mul(&tb)?.sum_all()?)?;
    let got = y.backward()?.get(x.as_tensor()).expect("dx").to_vec1::<bf16>()?;
    for ((g, a), b) in got.iter().zip(&a).zip(&b) {
        let want = *a + *b;
        let same = g.to_bits() == want.to_bits() || (g.is_nan() && want.is_nan());
        assert!(same, "{a:?} + {b:?}: {g:?} ({:#06x}), half gives {want:?} ({:#06x})", g.to_bits(), want.to_bits());
    }
    Ok(())
}
