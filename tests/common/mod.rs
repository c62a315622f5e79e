//! Shared test helpers: small experiment files written inline.
#![allow(dead_code)]

use std::path::Path;

use locograph::config::{parse_str, Loaded};
use locograph::graph::{compile, Plan};

/// The sections every experiment needs besides its graph.
pub const TAIL: &str = r#"
data: {format: synthetic, augment: {size: 8, jitter: null, blur: null, normalize: null}}
optimizer: {kind: sgd, momentum: 0.9}
schedule: {kind: constant, lr: 0.1}
train: {batch_size: 4, steps: 1}
"#;

/// A tiny 4-stage encoder (1×8×8 input) with the given decoders/losses/edges.
pub fn tiny(nodes: &str, edges: &str) -> String {
    format!(
        r#"version: 1
name: tiny
input: {{channels: 1, size: 8}}
nodes:
  stem: {{op: stem, kind: small, channels: 8}}
  res2: {{op: stage, block: basic, blocks: 1, channels: 8}}
  res3: {{op: stage, block: basic, blocks: 2, channels: 16, stride: 2}}
  res4: {{op: stage, block: bottleneck, blocks: 3, channels: 16, width: 4, stride: 2}}
  res5: {{op: stage, block: basic, blocks: 1, channels: 16, stride: 2}}
{nodes}
edges:
  - {{from: input, to: stem}}
{edges}
{TAIL}"#
    )
}

fn dec(name: &str, loss: &str) -> String {
    format!("  {name}: {{op: decoder, mlp: {{depth: 2, hidden: 8, out: 6}}}}\n  {loss}: {{op: nt_xent, temperature: 0.5}}\n")
}

pub fn simclr() -> String {
    tiny(
        &dec("dec", "L"),
        "  - {from: stem, to: res2}\n  - {from: res2, to: res3}\n  - {from: res3, to: res4}\n  - {from: res4, to: res5}\n  - {from: res5, to: dec}\n  - {from: dec, to: L}\n",
    )
}

pub fn gim() -> String {
    let nodes: String = (2..=5).map(|k| dec(&format!("dec{k}"), &format!("L{k}"))).collect();
    let mut edges = String::from("  - {from: stem, to: res2}\n");
    for k in 3..=5 {
        edges += &format!("  - {{from: res{}, to: res{k}, stop: all}}\n", k - 1);
    }
    for k in 2..=5 {
        edges += &format!("  - {{from: res{k}, to: dec{k}}}\n  - {{from: dec{k}, to: L{k}}}\n");
    }
    tiny(&nodes, &edges)
}

pub fn loco() -> String {
    let nodes = dec("dec1", "L1") + &dec("dec2", "L2") + &dec("dec3", "L3");
    tiny(
        &nodes,
        "  - {from: stem, to: res2}\n  - {from: res2, to: res3, stop: [L2]}\n  - {from: res3, to: res4, stop: [L3]}\n  - {from: res4, to: res5}\n  - {from: res3, to: dec1}\n  - {from: dec1, to: L1}\n  - {from: res4, to: dec2}\n  - {from: dec2, to: L2}\n  - {from: res5, to: dec3}\n  - {from: dec3, to: L3}\n",
    )
}

pub fn load(text: &str) -> Loaded {
    match parse_str(text, Path::new("tests/inline.yaml")) {
        Ok(l) => l,
        Err(e) => panic!("{e}\n{text}"),
    }
}

pub fn compiled(text: &str) -> (Loaded, Plan) {
    let l = load(text);
    let c = match compile(&l) {
        Ok(c) => c,
        Err(e) => panic!("{e}"),
    };
    (l, c)
}

/// Compares the engine's gradients with the reference's, parameter by parameter: both must
/// have one or neither, and where both do their largest difference relative to the reference's
/// largest magnitude is at most `tol`. Returns how many gradients were compared.
pub fn assert_grads_match(
    model: &locograph::exec::Model,
    engine: &[Option<candle_core::Tensor>],
    reference: &[Option<candle_core::Tensor>],
    tol: f32,
) -> usize {
    let mut checked = 0;
    for (i, p) in model.params.params.iter().enumerate() {
        match (&engine[i], &reference[i]) {
            (Some(g), Some(w)) => {
                let diff = (g - w).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
                let scale = w.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap().max(1e-6);
                assert!(diff / scale <= tol, "{}: engine and reference differ by {diff} (scale {scale})", p.name);
                checked += 1;
            }
            (None, None) => {}
            (a, b) => panic!("{}: engine has a gradient: {}, reference has one: {}", p.name, a.is_some(), b.is_some()),
        }
    }
    checked
}
