//! Methods beyond SimCLR/GIM/LoCo as graphs: nodes with several inputs, the batch's labels as a
//! graph input, and the supervised, reconstruction and predictive losses. The engine's parameter
//! gradients must equal the naive reference (one forward per loss, an explicit detach on every
//! edge that stops it: `exec::reference`), and bad graphs give located errors.

mod common;

use candle_core::{Device, Tensor};
use locograph::exec::{reference_grads, run_step, Model, StepInput};

/// A small encoder on 1×8×8 images, `extra` nodes and edges after it.
fn graph(nodes: &str, edges: &str) -> String {
    format!(
        r#"version: 1
name: methods
input: {{channels: 1, size: 8}}
nodes:
  stem: {{op: stem, kind: small, channels: 8}}
  res2: {{op: stage, block: basic, blocks: 2, channels: 8}}
  res3: {{op: stage, block: basic, blocks: 1, channels: 16, stride: 2}}
{nodes}
edges:
  - {{from: input, to: stem}}
  - {{from: stem, to: res2}}
{edges}
{}"#,
        common::TAIL
    )
}

fn batch() -> StepInput {
    let mut x = 7u64;
    let v: Vec<f32> = (0..8 * 64)
        .map(|_| {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((x >> 33) as f32 / (1u64 << 31) as f32) - 0.5
        })
        .collect();
    let images = Tensor::from_vec(v, (8, 1, 8, 8), &Device::Cpu).expect("images");
    // 4 images of 3 classes, both views labelled alike.
    let labels = Tensor::new(&[0u32, 2, 1, 2, 0, 2, 1, 2], &Device::Cpu).expect("labels");
    StepInput { images, labels: Some(labels) }
}

/// Engine gradients against the reference, every trainable parameter that either has.
fn parity(text: &str) -> usize {
    let (_, c) = common::compiled(text);
    let model = Model::new(&c, 5, &Device::Cpu).expect("model");
    let out = run_step(&c, &model, batch()).expect("step");
    let want = reference_grads(&c, &model, batch()).expect("reference");
    let checked = common::assert_grads_match(&model, &out.grads, &want, 1e-5);
    assert!(out.losses.iter().all(|(_, v)| v.is_finite()), "{:?}", out.losses);
    checked
}

const CLASSIFIER: &str = "{op: decoder, mlp: {depth: 2, hidden: 8, out: 3}}";

/// DGL (Belilovsky et al. 2020): each stage trained by its own auxiliary classifier, no gradient
/// between stages.
#[test]
fn supervised_local_learning_matches_the_reference() {
    let text = graph(
        &format!("  aux2: {CLASSIFIER}\n  CE2: {{op: cross_entropy}}\n  aux3: {CLASSIFIER}\n  CE3: {{op: cross_entropy}}\n"),
        "  - {from: res2, to: res3, stop: all}\n  - {from: res2, to: aux2}\n  - {from: aux2, to: CE2, as: logits}\n  - {from: labels, to: CE2, as: labels}\n  - {from: res3, to: aux3}\n  - {from: aux3, to: CE3, as: logits}\n  - {from: labels, to: CE3, as: labels}\n",
    );
    let checked = parity(&text);
    assert!(checked > 20, "{checked}");
    let (_, c) = common::compiled(&text);
    let s = locograph::graph::explain::summary(&c);
    assert!(s.contains(&"res2 <- CE2".to_string()) && s.contains(&"res3 <- CE3".to_string()), "{s:?}");
}

/// A loss with two inputs that both carry gradient, one of them through an edge that stops
/// another loss: each input's producer gets exactly its own share.
#[test]
fn a_two_input_loss_sends_each_input_its_gradient() {
    let text = graph(
        "  a: {op: decoder, mlp: {depth: 2, hidden: 8, out: 6}}\n  b: {op: decoder, mlp: {depth: 1, out: 6}}\n  M: {op: mse}\n  dec: {op: decoder, mlp: {depth: 2, hidden: 8, out: 6}}\n  L: {op: nt_xent}\n",
        "  - {from: res2, to: res3, stop: [L]}\n  - {from: res2, to: a}\n  - {from: a, to: M, as: prediction}\n  - {from: res3, to: b}\n  - {from: b, to: M, as: target}\n  - {from: res3, to: dec}\n  - {from: dec, to: L}\n",
    );
    let checked = parity(&text);
    assert!(checked > 20, "{checked}");
    let (_, c) = common::compiled(&text);
    let s = locograph::graph::explain::summary(&c);
    // M reaches res2 through both inputs (res3 → b as well as a); L stops at res2 -> res3.
    assert!(s.contains(&"res2 <- M".to_string()), "{s:?}");
    assert!(s.contains(&"res3 <- M + L".to_string()), "{s:?}");
}

/// SimSiam (Chen & He 2021): a predictor on the projection, the target branch stopped.
#[test]
fn simsiam_matches_the_reference_and_stops_the_target() {
    let text = graph(
        "  proj: {op: decoder, mlp: {depth: 2, hidden: 16, out: 8}}\n  pred: {op: decoder, mlp: {depth: 2, hidden: 4, out: 8}}\n  D: {op: neg_cosine}\n",
        "  - {from: res2, to: res3}\n  - {from: res3, to: proj}\n  - {from: proj, to: pred}\n  - {from: pred, to: D, as: prediction}\n  - {from: proj, to: D, as: target, stop: all}\n",
    );
    let checked = parity(&text);
    assert!(checked > 20, "{checked}");
    // Without the stop the projection gets a second gradient (through the target): different.
    let free = text.replace("as: target, stop: all", "as: target");
    let (_, c) = common::compiled(&text);
    let (_, f) = common::compiled(&free);
    let (m, mf) = (Model::new(&c, 5, &Device::Cpu).expect("model"), Model::new(&f, 5, &Device::Cpu).expect("model"));
    let (g, gf) = (run_step(&c, &m, batch()).expect("step"), run_step(&f, &mf, batch()).expect("step"));
    let i = m.params.params.iter().position(|p| p.name == "proj.mlp0.weight").expect("param");
    let d = (g.grads[i].as_ref().expect("grad") - gf.grads[i].as_ref().expect("grad"))
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(d > 1e-6, "the stop on the target changed nothing");
}

/// InfoPro (Wang et al. 2021): a module trained by the reconstruction of the input (the image
/// decoder's output against the graph's `input`) and a classifier, no gradient between modules.
#[test]
fn infopro_reconstruction_and_classification_match_the_reference() {
    let text = graph(
        &format!("  rec: {{op: image_decoder, channels: 1, size: 8, hidden: 4}}\n  R: {{op: mse, weight: 0.5}}\n  aux2: {CLASSIFIER}\n  CE2: {{op: cross_entropy, weight: 0.5}}\n  aux3: {CLASSIFIER}\n  CE3: {{op: cross_entropy}}\n"),
        "  - {from: res2, to: res3, stop: all}\n  - {from: res2, to: rec}\n  - {from: rec, to: R, as: prediction}\n  - {from: input, to: R, as: target}\n  - {from: res2, to: aux2}\n  - {from: aux2, to: CE2, as: logits}\n  - {from: labels, to: CE2, as: labels}\n  - {from: res3, to: aux3}\n  - {from: aux3, to: CE3, as: logits}\n  - {from: labels, to: CE3, as: labels}\n",
    );
    let checked = parity(&text);
    assert!(checked > 25, "{checked}");
    let (_, c) = common::compiled(&text);
    let s = locograph::graph::explain::summary(&c);
    assert!(s.contains(&"res2 <- R + CE2".to_string()) && s.contains(&"rec <- R".to_string()), "{s:?}");
    // The decoder resizes res2's 8×8 map to the image's 8×8 (a 4×4 res3 would be upsampled).
    assert_eq!(c.node("rec").expect("rec").shape, [1, 8, 8]);
    // A reconstruction of another size than the image is refused at the loss.
    let bad = text.replace("channels: 1, size: 8, hidden: 4", "channels: 1, size: 6, hidden: 4");
    let e = errors_of(&bad);
    assert!(e.contains("`prediction` [1, 6, 6] and `target` [1, 8, 8] must have the same shape"), "{e}");
}

fn errors_of(text: &str) -> String {
    let loaded = locograph::config::parse_str(text, std::path::Path::new("bad.yaml")).expect("parses");
    locograph::graph::compile(&loaded).expect_err("must not compile").to_string()
}

#[test]
fn bad_inputs_are_located_errors() {
    let base = |extra_edges: &str| {
        graph(
            &format!("  aux: {CLASSIFIER}\n  CE: {{op: cross_entropy}}\n"),
            &format!("  - {{from: res2, to: res3}}\n  - {{from: res3, to: aux}}\n{extra_edges}"),
        )
    };
    // An input the node does not take.
    let e = errors_of(&base("  - {from: aux, to: CE, as: logit}\n  - {from: labels, to: CE, as: labels}\n"));
    assert!(e.contains("has no input `logit`; its inputs are logits and labels") && e.contains("bad.yaml:"), "{e}");
    // A named input left out, and `as` on a one-input node.
    let e = errors_of(&base("  - {from: aux, to: CE, as: logits}\n  - {from: stem, to: aux, as: features}\n"));
    assert!(e.contains("no `labels` input"), "{e}");
    assert!(e.contains("`as: features` names an input, but `aux` (decoder) takes one input"), "{e}");
    // Labels into something else than a cross-entropy's labels.
    let e = errors_of(&base("  - {from: labels, to: CE, as: logits}\n  - {from: aux, to: CE, as: labels}\n"));
    assert!(e.contains("`labels` can only feed a cross_entropy"), "{e}");
    // No `as` on a two-input node.
    let e = errors_of(&base("  - {from: aux, to: CE}\n  - {from: labels, to: CE, as: labels}\n"));
    assert!(e.contains("takes logits and labels: say which with `as:`"), "{e}");
}

/// A label loss on a dataset without labels is refused before training, at the edge.
#[test]
fn a_label_loss_on_unlabeled_data_is_refused_at_the_edge() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Real STL-10 layout, unlabeled split: 96×96 images with no labels.
    let root = dir.path().join("stl10_binary");
    std::fs::create_dir_all(&root).expect("dir");
    std::fs::write(root.join("unlabeled_X.bin"), vec![7u8; 4 * 3 * 96 * 96]).expect("write");
    let text = format!(
        r#"version: 1
name: unlabeled
input: {{channels: 3, size: 32}}
nodes:
  stem: {{op: stem, kind: small, channels: 8}}
  aux: {CLASSIFIER}
  CE: {{op: cross_entropy}}
edges:
  - {{from: input, to: stem}}
  - {{from: stem, to: aux}}
  - {{from: aux, to: CE, as: logits}}
  - {{from: labels, to: CE, as: labels}}
data: {{format: stl10, path: {}, split: unlabeled, augment: {{size: 32, jitter: null, blur: null, normalize: null}}}}
optimizer: {{kind: sgd}}
schedule: {{kind: constant, lr: 0.1}}
train: {{batch_size: 2, steps: 1}}
"#,
        dir.path().display()
    );
    let file = dir.path().join("bad.yaml");
    std::fs::write(&file, &text).expect("write");
    let loaded = locograph::config::load(&file).expect("parses");
    let opts = locograph::exec::train::TrainOptions {
        quiet: true,
        run_dir: Some(dir.path().join("run")),
        ..Default::default()
    };
    let err = locograph::exec::train::train(&loaded, &opts).expect_err("no labels").to_string();
    let line = text.lines().position(|l| l.contains("from: labels")).expect("line") + 1;
    assert!(err.contains("reads the batch's labels") && err.contains(&format!("bad.yaml:{line}:")), "{err}");
}
