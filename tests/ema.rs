//! Moving-average nodes (`op: ema`, BYOL's target network): they start as a copy of the node they
//! average, no gradient reaches them, each step moves them to the closed form, and a resumed run
//! averages bit for bit like an uninterrupted one.

mod common;

use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use candle_core::{Device, Tensor};
use locograph::exec::train::{resume, train, TrainOptions};
use locograph::exec::{ema, run_step, Model};

/// BYOL on 1×8×8 synthetic images: an online encoder, projector and predictor; a target encoder
/// and projector that average the online ones; the symmetrised negative cosine.
fn byol(momentum: &str, final_momentum: &str) -> String {
    format!(
        r#"version: 1
name: byol
input: {{channels: 1, size: 8}}
nodes:
  stem: {{op: stem, kind: small, channels: 8}}
  enc: {{op: stage, block: basic, blocks: 1, channels: 8}}
  proj: {{op: decoder, mlp: {{depth: 2, hidden: 16, out: 8, batch_norm: true}}}}
  pred: {{op: decoder, mlp: {{depth: 2, hidden: 8, out: 8}}}}
  stem_t: {{op: ema, of: stem, momentum: {momentum}, final_momentum: {final_momentum}}}
  enc_t: {{op: ema, of: enc, momentum: {momentum}, final_momentum: {final_momentum}}}
  proj_t: {{op: ema, of: proj, momentum: {momentum}, final_momentum: {final_momentum}}}
  D: {{op: neg_cosine}}
edges:
  - {{from: input, to: stem}}
  - {{from: stem, to: enc}}
  - {{from: enc, to: proj}}
  - {{from: proj, to: pred}}
  - {{from: pred, to: D, as: prediction}}
  - {{from: input, to: stem_t}}
  - {{from: stem_t, to: enc_t}}
  - {{from: enc_t, to: proj_t}}
  - {{from: proj_t, to: D, as: target}}
data: {{format: synthetic, synthetic: {{train_size: 32, channels: 1, side: 8}}, augment: {{size: 8, jitter: null, blur: null, normalize: null}}}}
optimizer: {{kind: sgd, momentum: 0.9}}
schedule: {{kind: constant, lr: 0.05}}
train: {{batch_size: 8, steps: 6, log_every: 1, checkpoint_every: 3, threads: 1}}
"#
    )
}

fn values(t: &Tensor) -> Vec<f32> {
    t.flatten_all().and_then(|t| t.to_vec1::<f32>()).expect("values")
}

#[test]
fn the_target_starts_as_a_copy_gets_no_gradient_and_follows_the_closed_form() {
    let (_, c) = common::compiled(&byol("0.9", "0.9"));
    let model = Model::new(&c, 1, &Device::Cpu).expect("model");
    let find = |name: &str| model.params.params.iter().position(|p| p.name == name).expect(name);
    let (t, o) = (find("enc_t.block0.conv1.weight"), find("enc.block0.conv1.weight"));
    assert_eq!(values(model.params.params[t].var.as_tensor()), values(model.params.params[o].var.as_tensor()));
    assert!(!model.params.params[t].trainable, "a moving average is not trained");

    // No gradient reaches the target; the online side gets one.
    let x = Tensor::from_vec(
        (0..8 * 64).map(|i| ((i * 37 % 101) as f32 / 101.0) - 0.5).collect::<Vec<_>>(),
        (8, 1, 8, 8),
        &Device::Cpu,
    )
    .expect("batch");
    let out = run_step(&c, &model, &x).expect("step");
    assert!(out.grads[t].is_none() && out.grads[o].is_some());
    let s = locograph::graph::explain::table(&c);
    assert!(s.contains("Moving averages") && s.contains("enc_t of enc (momentum 0.9 → 0.9)"), "{s}");

    // θ_t(k) = m^k θ_t(0) + Σ_j (1 − m) m^(k−1−j) θ_o(j), with the online weights moved by hand.
    let m = 0.9f64;
    let start = values(model.params.params[t].var.as_tensor());
    let mut want: Vec<f64> = start.iter().map(|&v| v as f64).collect();
    for j in 0..5u64 {
        let online: Vec<f32> =
            start.iter().enumerate().map(|(i, &v)| v + (j as f32 + 1.0) * ((i % 7) as f32 - 3.0) * 0.01).collect();
        let shape = model.params.params[o].var.shape().clone();
        model.params.params[o]
            .var
            .set(&Tensor::from_vec(online.clone(), shape, &Device::Cpu).expect("t"))
            .expect("set");
        ema::update(&model, j, 5).expect("update");
        for (w, &on) in want.iter_mut().zip(&online) {
            *w = m * *w + (1.0 - m) * on as f64;
        }
    }
    let got = values(model.params.params[t].var.as_tensor());
    let err = got.iter().zip(&want).map(|(&g, &w)| (g as f64 - w).abs()).fold(0.0, f64::max);
    assert!(err < 1e-6, "largest difference from the closed form {err}");
}

#[test]
fn the_momentum_follows_byols_cosine() {
    let (_, c) = common::compiled(&byol("0.996", "1.0"));
    let e = c.graph.node_weights().find_map(|n| n.ema.clone()).expect("an ema node");
    assert_eq!(e.momentum_at(0, 100), 0.996);
    assert!((e.momentum_at(50, 100) - 0.998).abs() < 1e-12);
    assert!((e.momentum_at(100, 100) - 1.0).abs() < 1e-12);
}

fn weights(run: &Path) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<(String, Vec<u8>)> = candle_core::safetensors::load(run.join("weights.safetensors"), &Device::Cpu)
        .expect("weights")
        .into_iter()
        .map(|(k, t)| {
            (
                k,
                t.flatten_all()
                    .and_then(|t| t.to_vec1::<f32>())
                    .expect("f32")
                    .iter()
                    .flat_map(|f| f.to_le_bytes())
                    .collect(),
            )
        })
        .collect();
    v.sort();
    v
}

#[test]
fn a_resumed_run_averages_bit_for_bit_like_an_uninterrupted_one() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let text = byol("0.99", "1.0");
    let loaded = locograph::config::parse_str(&text, &tmp.path().join("byol.yaml")).expect("parse");
    let whole = tmp.path().join("whole");
    train(&loaded, &TrainOptions { run_dir: Some(whole.clone()), quiet: true, ..Default::default() }).expect("train");

    // The same run, stopped after its first step, then resumed.
    let parts = tmp.path().join("parts");
    let stop = Some(Arc::new(AtomicBool::new(true)));
    let s = train(&loaded, &TrainOptions { run_dir: Some(parts.clone()), quiet: true, stop, ..Default::default() })
        .expect("train");
    assert!(s.interrupted && s.steps == 1, "{s:?}");
    resume(&parts, &TrainOptions { quiet: true, ..Default::default() }).expect("resume");

    let (a, b) = (weights(&whole), weights(&parts));
    assert!(a.iter().any(|(k, _)| k.starts_with("enc_t.")), "the averages are saved");
    assert_eq!(a.len(), b.len());
    for ((ka, va), (kb, vb)) in a.iter().zip(&b) {
        assert_eq!(ka, kb);
        assert!(va == vb, "`{ka}` differs after resuming");
    }
}

fn errors_of(text: &str) -> String {
    let loaded = locograph::config::parse_str(text, Path::new("bad.yaml")).expect("parses");
    locograph::graph::compile(&loaded).expect_err("must not compile").to_string()
}

#[test]
fn bad_moving_averages_are_located_errors() {
    let text = byol("0.9", "1.0");
    let line = |needle: &str| text.lines().position(|l| l.contains(needle)).expect("line") + 1;
    let e = errors_of(&text.replace("of: enc,", "of: encoder,"));
    assert!(
        e.contains("`enc_t` averages `encoder`, which does not exist")
            && e.contains(&format!("bad.yaml:{}:", line("enc_t:"))),
        "{e}"
    );
    let e = errors_of(&text.replace("of: proj,", "of: D,"));
    assert!(e.contains("`proj_t` averages `D`, a neg_cosine"), "{e}");
    // The target encoder reads the input directly: another shape than `enc` reads.
    let e = errors_of(
        &text
            .replace("{from: stem_t, to: enc_t}", "{from: input, to: enc_t}")
            .replace("  - {from: input, to: stem_t}\n", "")
            .replace("  stem_t: {op: ema, of: stem, momentum: 0.9, final_momentum: 1.0}\n", ""),
    );
    assert!(e.contains("`enc_t` averages `enc`, but reads [1, 8, 8] where `enc` reads [8, 8, 8]"), "{e}");
    let e = errors_of(&text.replace("momentum: 0.9,", "momentum: 1.5,"));
    assert!(e.contains("the momenta must lie in [0, 1]"), "{e}");
}
