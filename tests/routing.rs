//! Gradient routing: reachability goldens and parity with the naive per-loss reference.

mod common;

use candle_core::{DType, Device, Tensor};
use locograph::exec::{reference_grads, run_step, Model};
use locograph::graph::explain::summary;

#[test]
fn reachability_goldens_for_the_three_methods() {
    let (_, c) = common::compiled(&common::simclr());
    assert_eq!(summary(&c), ["stem <- L", "res2 <- L", "res3 <- L", "res4 <- L", "res5 <- L", "dec <- L"]);
    let (_, c) = common::compiled(&common::gim());
    let s = summary(&c);
    for k in 2..=5 {
        assert!(s.contains(&format!("res{k} <- L{k}")), "{s:?}");
        assert!(s.contains(&format!("dec{k} <- L{k}")), "{s:?}");
    }
    assert!(s.contains(&"stem <- L2".to_string()));
    let (_, c) = common::compiled(&common::loco());
    let s = summary(&c);
    for want in [
        "stem <- L1",
        "res2 <- L1",
        "res3 <- L1 + L2",
        "res4 <- L2 + L3",
        "res5 <- L3",
        "dec1 <- L1",
        "dec2 <- L2",
        "dec3 <- L3",
    ] {
        assert!(s.contains(&want.to_string()), "missing {want} in {s:?}");
    }
}

fn batch(seed: u64) -> Tensor {
    // Deterministic pseudo-random images without candle's (unseedable) RNG.
    let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    let v: Vec<f32> = (0..8 * 64)
        .map(|_| {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((x >> 33) as f32 / (1u64 << 31) as f32) - 0.5
        })
        .collect();
    Tensor::from_vec(v, (8, 1, 8, 8), &Device::Cpu).expect("batch")
}

fn parity(text: &str) -> Vec<usize> {
    let (_, c) = common::compiled(text);
    let model = Model::new(&c, 3, &Device::Cpu).expect("model");
    let x = batch(1);
    let out = run_step(&c, &model, &x).expect("step");
    let want = reference_grads(&c, &model, &x).expect("reference");
    let checked = common::assert_grads_match(&model, &out.grads, &want, 1e-5);
    assert!(checked > 20, "only {checked} gradients compared");
    out.passes
}

#[test]
fn engine_matches_naive_reference_simclr() {
    parity(&common::simclr());
}

#[test]
fn engine_matches_naive_reference_gim() {
    parity(&common::gim());
}

#[test]
fn engine_matches_naive_reference_loco_and_doubles_only_shared_backwards() {
    let text = common::loco();
    let passes = parity(&text);
    let (_, c) = common::compiled(&text);
    let count = |id: &str| passes[c.ids[id].index()];
    assert_eq!(count("res3"), 2, "res3 is shared by L1 and L2");
    assert_eq!(count("res4"), 2, "res4 is shared by L2 and L3");
    for id in ["stem", "res2", "res5", "dec1", "dec2", "dec3", "L1", "L2", "L3"] {
        assert_eq!(count(id), 1, "{id}");
    }
    assert_eq!(count("input"), 0);
}

/// A naive "sum the losses, one backward" implementation differs from LoCo: it leaks L2 into res2.
#[test]
fn summed_single_backward_would_be_wrong_for_loco() {
    let (_, c) = common::compiled(&common::loco());
    let model = Model::new(&c, 3, &Device::Cpu).expect("model");
    let x = batch(2);
    let engine = run_step(&c, &model, &x).expect("step");
    // Sum of losses over a graph with no stops at all.
    let (_, plain) = common::compiled(&common::loco().replace(", stop: [L2]", "").replace(", stop: [L3]", ""));
    let plain_model = Model::new(&plain, 3, &Device::Cpu).expect("model");
    let summed = run_step(&plain, &plain_model, &x).expect("step");
    let i = model.params.params.iter().position(|p| p.name == "res2.block0.conv1.weight").expect("param");
    let a = engine.grads[i].as_ref().expect("grad");
    let b = summed.grads[i].as_ref().expect("grad");
    let d = (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    assert!(d > 1e-6, "stops had no effect on res2");
    let _ = DType::F32;
}
