//! Bad experiment files: every problem reported with file:line, exit code 2, never a panic.

mod common;

use std::path::Path;
use std::process::Command;

fn validate(text: &str) -> (i32, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("bad.yaml");
    std::fs::write(&file, text).expect("write");
    let out = Command::new(env!("CARGO_BIN_EXE_locograph")).arg("validate").arg(&file).output().expect("run");
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!stderr.contains("panicked"), "panic: {stderr}");
    (out.status.code().unwrap_or(-1), stderr.replace(&file.display().to_string(), "bad.yaml"))
}

fn line_of(text: &str, needle: &str) -> usize {
    text.lines().position(|l| l.contains(needle)).map(|i| i + 1).unwrap_or_else(|| panic!("{needle} not in text"))
}

#[test]
fn typo_in_a_key_names_file_line_and_path() {
    let text = common::simclr().replace("blocks: 1, channels: 8}", "blokcs: 1, channels: 8}");
    let (code, err) = validate(&text);
    assert_eq!(code, 2, "{err}");
    let line = line_of(&text, "blokcs");
    assert!(err.contains(&format!("bad.yaml:{line}:")), "{err}");
    assert!(err.contains("nodes.res2") && err.contains("blokcs"), "{err}");
}

#[test]
fn wrong_type_is_reported() {
    let text = common::simclr().replace("temperature: 0.5", "temperature: warm");
    let (code, err) = validate(&text);
    assert_eq!(code, 2);
    assert!(err.contains("nodes.L") && err.contains("invalid type"), "{err}");
    assert!(err.contains(&format!("bad.yaml:{}:", line_of(&text, "temperature: warm"))), "{err}");
}

#[test]
fn all_errors_at_once() {
    let text = common::simclr()
        .replace("blocks: 1, channels: 8}", "blokcs: 1, channels: 8}")
        .replace("temperature: 0.5", "temperature: warm")
        .replace("name: tiny", "name: tiny\nlearning_rate: 3");
    let (code, err) = validate(&text);
    assert_eq!(code, 2);
    assert!(err.contains("3 errors"), "{err}");
    assert!(err.contains("unknown key `learning_rate`"), "{err}");
}

#[test]
fn cycle_is_reported_at_a_node() {
    let text = common::simclr().replace("  - {from: res2, to: res3}", "  - {from: res4, to: res3}");
    // res3 now has no path from input and res3 <-> res4 form a cycle.
    let text = text.replace("  - {from: res3, to: res4}", "  - {from: res3, to: res4}\n  - {from: res4, to: res3x}");
    let (code, err) = validate(&text.replace("  - {from: res4, to: res3x}\n", ""));
    assert_eq!(code, 2);
    assert!(err.contains("cycle"), "{err}");
    assert!(err.contains("bad.yaml:"), "{err}");
}

#[test]
fn edge_to_a_missing_node() {
    let text = common::simclr().replace("{from: res5, to: dec}", "{from: res5, to: decoder}");
    let (code, err) = validate(&text);
    assert_eq!(code, 2);
    assert!(err.contains("unknown node `decoder`"), "{err}");
    assert!(err.contains(&format!("bad.yaml:{}:", line_of(&text, "to: decoder"))), "{err}");
    // The decoder that lost its input is reported too.
    assert!(err.contains("`dec` has no input"), "{err}");
}

#[test]
fn stop_naming_a_missing_loss() {
    let text = common::loco().replace("stop: [L2]", "stop: [L7]");
    let (code, err) = validate(&text);
    assert_eq!(code, 2);
    assert!(err.contains("stop names `L7`, which does not exist"), "{err}");
    assert!(err.contains(&format!("bad.yaml:{}:", line_of(&text, "stop: [L7]"))), "{err}");
}

#[test]
fn channel_mismatch_found_by_shape_inference() {
    let text = common::simclr().replace("channels: 16, stride: 2}", "channels: 16, stride: 2, in_channels: 32}");
    let (code, err) = validate(&text);
    assert_eq!(code, 2);
    assert!(err.contains("in_channels is 32 but the input has 8 channels"), "{err}");
    assert!(err.contains(&format!("bad.yaml:{}:", line_of(&text, "in_channels: 32"))), "{err}");
}

#[test]
fn trainable_node_reached_by_no_loss() {
    // GIM with the decoder of res3 removed: res3 is stopped from L4 and has no loss of its own.
    let text = common::gim().replace("  - {from: res3, to: dec3}\n  - {from: dec3, to: L3}\n", "");
    let text = text.replace(
        "  dec3: {op: decoder, mlp: {depth: 2, hidden: 8, out: 6}}\n  L3: {op: nt_xent, temperature: 0.5}\n",
        "",
    );
    let (code, err) = validate(&text);
    assert_eq!(code, 2);
    assert!(err.contains("trainable node `res3` is reached by no loss"), "{err}");
    assert!(err.contains("L4 is stopped at `res3 -> res4`"), "{err}");
}

#[test]
fn missing_file_and_syntax_error() {
    let out =
        Command::new(env!("CARGO_BIN_EXE_locograph")).args(["validate", "does/not/exist.yaml"]).output().expect("run");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read"));
    let (code, err) = validate("version: 1\nnodes: [\n");
    assert_eq!(code, 2);
    assert!(err.contains("YAML syntax") && err.contains("bad.yaml:"), "{err}");
}

#[test]
fn a_good_file_validates_and_explains() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("good.yaml");
    std::fs::write(&file, common::loco()).expect("write");
    let out = Command::new(env!("CARGO_BIN_EXE_locograph")).arg("validate").arg(&file).output().expect("run");
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let out = Command::new(env!("CARGO_BIN_EXE_locograph")).arg("explain").arg(&file).output().expect("run");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("res3  stage    L1 + L2     L3 (stopped at res3 -> res4)"), "{text}");
    let out =
        Command::new(env!("CARGO_BIN_EXE_locograph")).args(["explain", "--dot"]).arg(&file).output().expect("run");
    let dot = String::from_utf8_lossy(&out.stdout);
    assert!(
        dot.starts_with("digraph") && dot.contains("\"res2\" -> \"res3\" [style=dashed, color=red, label=\"stop L2\"]"),
        "{dot}"
    );
    let _ = Path::new("");
}

#[test]
fn schema_is_json_with_the_experiment_keys() {
    let out = Command::new(env!("CARGO_BIN_EXE_locograph")).arg("schema").output().expect("run");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let props = v["properties"].as_object().expect("properties");
    for k in ["version", "nodes", "edges", "data", "optimizer", "schedule", "train"] {
        assert!(props.contains_key(k), "{k}");
    }
    assert_eq!(v["additionalProperties"], serde_json::Value::Bool(false));
}

#[test]
fn cuda_device_in_a_cpu_build_is_a_clear_error() {
    if cfg!(feature = "cuda") {
        return;
    }
    let text = common::simclr().replace("name: tiny", "name: tiny\ndevice: cuda");
    let (code, err) = validate(&text);
    assert_eq!(code, 2);
    assert!(err.contains("needs a build with `--features cuda`"), "{err}");
    assert!(err.contains(&format!("bad.yaml:{}:", line_of(&text, "device: cuda"))), "{err}");
}

#[test]
/// bf16 on CPU runs where locograph is built with oneDNN, and is a located error elsewhere.
fn bf16_on_cpu_needs_onednn() {
    let text = common::simclr().replace("name: tiny", "name: tiny\nprecision: bf16");
    let (code, err) = validate(&text);
    if locograph::dnnl::enabled() {
        assert_eq!(code, 0, "{err}");
    } else {
        assert_eq!(code, 2);
        assert!(err.contains("`precision: bf16` on CPU needs oneDNN's kernels"), "{err}");
        assert!(err.contains(&format!("bad.yaml:{}:", line_of(&text, "precision: bf16"))), "{err}");
    }
    // f16 is accepted on CPU, and a misspelt precision names the choices.
    assert_eq!(validate(&common::simclr().replace("name: tiny", "name: tiny\nprecision: f16")).0, 0);
    let (code, err) = validate(&common::simclr().replace("name: tiny", "name: tiny\nprecision: fp16"));
    assert_eq!(code, 2);
    assert!(err.contains("bf16") && err.contains("f16"), "{err}");
}

#[test]
fn lars_former_key_still_loads_with_a_located_deprecation_warning() {
    let text = common::simclr()
        .replace("optimizer: {kind: sgd, momentum: 0.9}", "optimizer:\n  kind: lars\n  exclude_bias_and_norm: false\n");
    let (code, err) = validate(&text);
    assert_eq!(code, 0, "{err}");
    let line = line_of(&text, "exclude_bias_and_norm: false");
    assert!(err.contains(&format!("bad.yaml:{line}:")), "{err}");
    assert!(err.contains("deprecated") && err.contains("exclude_bias_and_norm_from_weight_decay"), "{err}");
    let loaded = common::load(&text);
    let v = serde_json::to_value(&loaded.experiment.optimizer).expect("json");
    assert_eq!(v["exclude_bias_and_norm_from_weight_decay"], false, "{v}");
}
