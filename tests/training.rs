//! Training end to end: each method overfits a fixed batch; a run writes a complete run
//! directory whose weights load back.

mod common;

use std::process::Command;

use candle_core::{Device, Tensor};
use locograph::exec::run_dir::open_run;
use locograph::exec::{forward_to, run_step, Model};
use locograph::optim::OptimizerConfig;

/// 8 fixed images, each seen as two slightly different views.
fn fixed_batch() -> Tensor {
    let mut x: u64 = 12345;
    let mut rnd = move || {
        x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((x >> 33) as f32 / (1u64 << 31) as f32) - 0.5
    };
    let base: Vec<f32> = (0..8 * 64).map(|_| rnd()).collect();
    let v1: Vec<f32> = base.iter().map(|v| v + 0.05 * rnd()).collect();
    let v2: Vec<f32> = base.iter().map(|v| v + 0.05 * rnd()).collect();
    Tensor::from_vec([v1, v2].concat(), (16, 1, 8, 8), &Device::Cpu).expect("batch")
}

fn overfit(text: &str) -> (Vec<f32>, Vec<f32>) {
    let (_, c) = common::compiled(text);
    let model = Model::new(&c, 0, &Device::Cpu).expect("model");
    let cfg: OptimizerConfig = serde_yaml::from_str("{kind: adamw, weight_decay: 0.0}").expect("optimizer");
    let mut opt = cfg.build();
    let x = fixed_batch();
    let mut first = vec![];
    let mut last = vec![];
    for step in 0..40 {
        let out = run_step(&c, &model, &x).expect("step");
        last = out.losses.iter().map(|(_, v)| *v).collect();
        if step == 0 {
            first = last.clone();
        }
        opt.step(&model.params.params, &out.grads, 1e-2).expect("optimizer step");
    }
    (first, last)
}

fn assert_halved(name: &str, (first, last): (Vec<f32>, Vec<f32>)) {
    for (i, (a, b)) in first.iter().zip(&last).enumerate() {
        assert!(b <= &(a * 0.5), "{name} loss {i}: {a} → {b} did not fall by half in 40 steps");
    }
}

#[test]
fn simclr_overfits_a_fixed_batch() {
    assert_halved("simclr", overfit(&common::simclr()));
}

#[test]
fn gim_overfits_a_fixed_batch() {
    assert_halved("gim", overfit(&common::gim()));
}

#[test]
fn loco_overfits_a_fixed_batch() {
    assert_halved("loco", overfit(&common::loco()));
}

#[test]
fn run_writes_a_complete_run_directory_that_opens_again() {
    let dir = tempfile::tempdir().expect("tempdir");
    let text = common::loco()
        .replace("train: {batch_size: 4, steps: 1}", "train: {batch_size: 8, steps: 4, log_every: 2}")
        .replace(
            "data: {format: synthetic,",
            "data: {format: synthetic, synthetic: {train_size: 64, channels: 1, side: 8},",
        );
    let file = dir.path().join("loco_tiny.yaml");
    std::fs::write(&file, &text).expect("write");
    let runs = dir.path().join("runs");
    let out = Command::new(env!("CARGO_BIN_EXE_locograph"))
        .args(["run", "--quiet", "--runs-dir"])
        .arg(&runs)
        .arg(&file)
        .output()
        .expect("run");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    let run = std::fs::read_dir(&runs).expect("runs").next().expect("one run").expect("entry").path();
    for f in ["config.yaml", "explain.txt", "derived.json", "metrics.csv", "weights.safetensors", "meta.json"] {
        assert!(run.join(f).exists(), "{f} missing in {}", run.display());
    }
    let metrics = std::fs::read_to_string(run.join("metrics.csv")).expect("metrics");
    let mut lines = metrics.lines();
    assert_eq!(lines.next(), Some("step,epoch,lr,L1,L2,L3,images_per_sec,elapsed_s"));
    let rows: Vec<&str> = lines.collect();
    assert_eq!(rows.len(), 2, "{metrics}");
    assert!(rows[1].starts_with("4,"));
    let derived: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("derived.json")).expect("derived")).expect("json");
    assert_eq!(derived["method"], "loco");
    assert_eq!(derived["views_per_step"], 16);
    // The weights load back under the node-id keys, and a changed graph is refused.
    let opened = open_run(&run, &Device::Cpu).expect("open");
    assert_eq!(opened.meta["step"], 4);
    let x = fixed_batch();
    let res5 = opened.plan.ids["res5"];
    let y = forward_to(&opened.plan, &opened.model, &x, res5).expect("forward");
    assert_eq!(y.dims(), &[16, 16, 1, 1]);
    let names: Vec<&str> = opened.model.params.params.iter().map(|p| p.name.as_str()).collect();
    assert!(names.contains(&"res3.block0.conv1.weight") && names.contains(&"dec2.mlp1.bias"), "{names:?}");
    let cfg = run.join("config.yaml");
    let changed = std::fs::read_to_string(&cfg).expect("config").replace("channels: 16", "channels: 24");
    std::fs::write(&cfg, changed).expect("write");
    let err = open_run(&run, &Device::Cpu).err().expect("a mismatch").to_string();
    assert!(err.contains("do not match the graph") && err.contains("res4."), "{err}");
}

#[test]
fn nan_loss_stops_the_run_naming_loss_and_step() {
    let dir = tempfile::tempdir().expect("tempdir");
    let text = common::simclr()
        .replace("schedule: {kind: constant, lr: 0.1}", "schedule: {kind: constant, lr: 1.0e30}")
        .replace("train: {batch_size: 4, steps: 1}", "train: {batch_size: 8, steps: 20}")
        .replace(
            "data: {format: synthetic,",
            "data: {format: synthetic, synthetic: {train_size: 64, channels: 1, side: 8},",
        );
    let file = dir.path().join("nan.yaml");
    std::fs::write(&file, &text).expect("write");
    let out = Command::new(env!("CARGO_BIN_EXE_locograph"))
        .args(["run", "--quiet", "--runs-dir"])
        .arg(dir.path().join("runs"))
        .arg(&file)
        .output()
        .expect("run");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(4), "{stderr}");
    assert!(stderr.contains("loss `L` is") && stderr.contains("at step"), "{stderr}");
}

/// Mixed precision (`precision: f16`, the CPU stand-in for bf16 on CUDA): the step computes in
/// half precision, but every parameter gradient arrives in f32 (master weights), agrees with
/// the f32 step's, and training still works. LoCo, so the routed backward runs in f16 too.
#[test]
fn half_precision_step_keeps_f32_master_weights_and_matches_f32() {
    half_precision_step(candle_core::DType::F16);
}

/// The same in bf16 (refused with the reason where oneDNN is not built or switched off), which on CPU runs oneDNN's bf16 convolutions and the fused batch norms on
/// bf16 activations.
#[test]
fn bf16_step_keeps_f32_master_weights_and_matches_f32() {
    if !locograph::dnnl::enabled() {
        // LOCOGRAPH_DNNL=0: the step is refused with the reason (the config check says the same).
        let (_, c) = common::compiled(&common::loco());
        let half = Model::new(&c, 0, &Device::Cpu).expect("model").with_compute(candle_core::DType::BF16);
        let Err(err) = run_step(&c, &half, &fixed_batch()) else { panic!("bf16 without oneDNN ran") };
        let err = err.to_string();
        assert!(err.contains("needs oneDNN"), "{err}");
        return;
    }
    half_precision_step(candle_core::DType::BF16);
}

fn half_precision_step(dtype: candle_core::DType) {
    // One block per stage: at this toy width (batch norm over 8 images of 2×2 pixels in res4)
    // f16 rounding compounds over deeper stages past what a per-tensor cosine can bound.
    let text = common::loco().replace("blocks: 2,", "blocks: 1,").replace("blocks: 3,", "blocks: 1,");
    let (_, c) = common::compiled(&text);
    let full = Model::new(&c, 0, &Device::Cpu).expect("model");
    let half = Model::new(&c, 0, &Device::Cpu).expect("model").with_compute(dtype);
    let x = fixed_batch();
    let a = run_step(&c, &full, &x).expect("f32 step");
    let b = run_step(&c, &half, &x).expect("half-precision step");
    for ((_, la), (_, lb)) in a.losses.iter().zip(&b.losses) {
        assert!((la - lb).abs() < 1e-2 * la.abs(), "loss f32 {la} vs {dtype:?} {lb}");
    }
    let flat = |t: &Tensor| t.flatten_all().and_then(|t| t.to_vec1::<f32>()).expect("f32 gradient");
    let cosine = |a: &[f32], b: &[f32]| {
        let dot: f32 = a.iter().zip(b).map(|(a, b)| a * b).sum();
        dot / (a.iter().map(|v| v * v).sum::<f32>().sqrt() * b.iter().map(|v| v * v).sum::<f32>().sqrt())
    };
    let (mut all_a, mut all_b) = (vec![], vec![]);
    // Cosine bounds per tensor and over all gradients (see below for bf16's).
    let (each, all) = if dtype == candle_core::DType::BF16 { (0.5, 0.97) } else { (0.95, 0.995) };
    for (p, (ga, gb)) in half.params.params.iter().zip(a.grads.iter().zip(&b.grads)) {
        let (ga, gb) = (ga.as_ref().expect("grad"), gb.as_ref().expect("grad"));
        assert_eq!(p.var.dtype(), candle_core::DType::F32, "{}: master weight", p.name);
        assert_eq!(gb.dtype(), candle_core::DType::F32, "{}: gradient type", p.name);
        let (va, vb) = (flat(ga), flat(gb));
        // f16 keeps ~3 significant digits, so a small tensor's gradient can turn by a few
        // degrees; all of them together must agree closely. bf16 keeps 8 bits (8× f16's
        // rounding step): at this toy size res4's batch norm normalises 32 values per channel
        // and its γ gradient, a sum that nearly cancels, turns most (cosine 0.61 measured; the
        // shallower layers and heads stay above 0.95, all gradients together 0.98). A wrong
        // bf16 kernel (a layout or a dropped term) gives cosines near 0.
        if va.iter().any(|v| v.abs() > 1e-6) {
            let c = cosine(&va, &vb);
            assert!(c > each, "{}: cosine(f32 grad, {dtype:?} grad) = {c}", p.name);
        }
        all_a.extend(va);
        all_b.extend(vb);
    }
    assert!(cosine(&all_a, &all_b) > all, "all gradients: cosine {}", cosine(&all_a, &all_b));
    // And it still learns: the losses halve on the fixed batch like in f32.
    let cfg: OptimizerConfig = serde_yaml::from_str("{kind: adamw, weight_decay: 0.0}").expect("optimizer");
    let mut opt = cfg.build();
    let first: Vec<f32> = b.losses.iter().map(|(_, v)| *v).collect();
    let mut last = first.clone();
    for _ in 0..40 {
        let out = run_step(&c, &half, &x).expect("step");
        last = out.losses.iter().map(|(_, v)| *v).collect();
        opt.step(&half.params.params, &out.grads, 1e-2).expect("optimizer step");
    }
    assert_halved(&format!("loco {dtype:?}"), (first, last));
}

/// Training updates each node as soon as its gradients are final (`update_when_final`, which
/// is what lets a local method drop a unit's gradients early). That must be exactly the update
/// of one optimizer step after the whole step: checked for LoCo (shared stages: a node is final
/// only after its second backward) and GIM, with SGD, AdamW and LARS, over three steps.
#[test]
fn updating_each_node_when_final_equals_one_update_after_the_step() {
    use locograph::exec::train::update_when_final;
    use locograph::exec::{run_step_with, GradsFinal, Hooks};
    let x = fixed_batch();
    for text in [common::loco(), common::gim()] {
        for opt in [
            "{kind: sgd, momentum: 0.9, weight_decay: 1.0e-4}",
            "{kind: adamw, weight_decay: 0.01}",
            "{kind: lars, weight_decay: 1.0e-6}",
        ] {
            let cfg: OptimizerConfig = serde_yaml::from_str(opt).expect("optimizer");
            let (_, c) = common::compiled(&text);
            let (early, late) =
                (Model::new(&c, 0, &Device::Cpu).expect("model"), Model::new(&c, 0, &Device::Cpu).expect("model"));
            let (mut oe, mut ol) = (cfg.build(), cfg.build());
            for _ in 0..3 {
                let mut update = |f: GradsFinal<'_>| update_when_final(oe.as_mut(), &early, f, 0.05);
                let out = run_step_with(&c, &early, &x, Hooks { grads_final: Some(&mut update), ..Hooks::default() })
                    .expect("step");
                assert!(out.grads.iter().all(Option::is_none), "every gradient was taken by the hook");
                let out = run_step(&c, &late, &x).expect("step");
                ol.step(&late.params.params, &out.grads, 0.05).expect("optimizer step");
            }
            for (a, b) in early.params.params.iter().zip(&late.params.params) {
                let d = a
                    .var
                    .as_tensor()
                    .sub(b.var.as_tensor())
                    .and_then(|t| t.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>());
                assert_eq!(d.expect("diff"), 0.0, "{opt}: {} differs", a.name);
            }
        }
    }
}
