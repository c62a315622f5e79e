//! Channels-last activations (convolutions on oneDNN write NHWC; batch norm and the links keep
//! it through a stage) against the all-NCHW path, on one LoCo step (stop edges, a stage shared
//! by two units, residual blocks and their tails): the same losses and parameter gradients, in
//! f32 to rounding and in bf16 to bf16's rounding. One test: the switch is process-wide.

mod common;

use candle_core::{DType, Device, Tensor};
use locograph::exec::{run_step, Model};

/// 8 images of 8×8 pixels, two views each.
fn batch() -> Tensor {
    let v: Vec<f32> = (0..16 * 64).map(|i| ((i * 37 % 101) as f32 / 17.0).sin()).collect();
    Tensor::from_vec(v, (16, 1, 8, 8), &Device::Cpu).expect("batch")
}

fn flat(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64).and_then(|t| t.flatten_all()).and_then(|t| t.to_vec1::<f64>()).expect("gradient")
}

#[test]
fn channels_last_step_matches_nchw() {
    if !locograph::dnnl::enabled() {
        eprintln!("convolutions run on im2col here (no oneDNN): every activation is NCHW");
        return;
    }
    // res3's second block is 16 → 16 channels: NHWC buffers oneDNN reads as nChw16c in bf16.
    let (_, plan) = common::compiled(&common::loco());
    for dtype in [DType::F32, DType::BF16] {
        let model = Model::new(&plan, 0, &Device::Cpu).expect("model").with_compute(dtype);
        let step = |on: bool| {
            locograph::dnnl::set_channels_last(on);
            run_step(&plan, &model, &batch()).expect("step")
        };
        let (nchw, nhwc) = (step(false), step(true));
        let (loss_tol, grad_tol) = if dtype == DType::F32 { (1e-5, 1e-4) } else { (1e-2, 5e-2) };
        for ((name, a), (_, b)) in nchw.losses.iter().zip(&nhwc.losses) {
            assert!((a - b).abs() <= loss_tol * a.abs(), "{dtype:?} {name:?}: loss NCHW {a} vs NHWC {b}");
        }
        let mut compared = 0;
        for (p, (a, b)) in model.params.params.iter().zip(nchw.grads.iter().zip(&nhwc.grads)) {
            let (Some(a), Some(b)) = (a, b) else {
                assert_eq!(a.is_some(), b.is_some(), "{}: reached on one path only", p.name);
                continue;
            };
            let (a, b) = (flat(a), flat(b));
            let size = a.iter().fold(0f64, |m, v| m.max(v.abs()));
            let err = a.iter().zip(&b).fold(0f64, |m, (x, y)| m.max((x - y).abs())) / size.max(1e-30);
            assert!(err <= grad_tol, "{dtype:?} {}: gradient rel err {err:e}", p.name);
            compared += 1;
        }
        assert!(compared > 10, "{compared} gradients compared");
    }
    locograph::dnnl::set_channels_last(true);
}
