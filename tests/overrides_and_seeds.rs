//! `--set PATH=VALUE` and `--seeds`: an override changes the value it names and is checked like
//! a line of the file (a typo is a located error listing the keys that exist there); the run
//! directory records it; `--seeds` writes one run per seed and a mean ± std summary, which
//! `locograph eval` on the group completes with the evaluations.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use locograph::config::{load_with, NodeConfig, Override};

fn locograph(args: &[&str], files: &[&Path]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_locograph"));
    c.args(args).args(files);
    c.output().expect("run locograph")
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

fn line_of(text: &str, needle: &str) -> usize {
    text.lines().position(|l| l.contains(needle)).map(|i| i + 1).unwrap_or_else(|| panic!("{needle} not in text"))
}

/// A tiny LoCo experiment on generated data, short enough to train in seconds.
fn tiny_run_file(dir: &Path) -> PathBuf {
    let text = common::loco()
        .replace("train: {batch_size: 4, steps: 1}", "train: {batch_size: 8, steps: 4, log_every: 2}")
        .replace(
            "data: {format: synthetic,",
            "data: {format: synthetic, synthetic: {train_size: 64, test_size: 32, channels: 1, side: 8},",
        );
    let file = dir.join("loco_tiny.yaml");
    std::fs::write(&file, text).expect("write");
    file
}

#[test]
fn an_override_changes_the_value_it_names() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = tiny_run_file(dir.path());
    let sets: Vec<Override> =
        ["seed=7", "schedule.lr=0.25", "edges[1].stop=all", "nodes.res3.blocks=3", "train.threads=1"]
            .iter()
            .map(|s| s.parse().expect("override"))
            .collect();
    let l = load_with(&file, &sets).unwrap_or_else(|e| panic!("{e}"));
    let e = &l.experiment;
    assert_eq!(e.seed, 7);
    assert_eq!(e.train.threads, Some(1));
    assert_eq!(serde_json::to_value(&e.schedule).expect("json")["lr"], 0.25);
    assert_eq!(serde_json::to_value(&e.edges[1]).expect("json")["stop"], "all");
    let NodeConfig::Stage(res3) = &e.nodes["res3"] else { panic!("res3 is a stage") };
    assert_eq!(res3.blocks, 3);
    assert_eq!(l.overrides.len(), 5);

    // The same through the command line: `edges[3]` is res3 -> res4 (stop [L3]); stopping all
    // there keeps L2 out of res3, and `explain` says so.
    let before = text(&locograph(&["explain"], &[&file]));
    let after = text(&locograph(&["explain", "--set", "edges[3].stop=all"], &[&file]));
    assert!(before.contains("res3  stage    L1 + L2"), "{before}");
    assert!(after.contains("res3  stage    L1          L2 (stopped at res3 -> res4)"), "{after}");
}

#[test]
fn an_override_of_an_encoder_file_node_changes_that_node() {
    let file = Path::new("experiments/loco_resnet18narrow_fmnist.yaml");
    let l = load_with(file, &["nodes.res3.blocks=3".parse().expect("override")]).unwrap_or_else(|e| panic!("{e}"));
    let NodeConfig::Stage(res3) = &l.experiment.nodes["res3"] else { panic!("res3 is a stage") };
    assert_eq!(res3.blocks, 3);
    // A node that exists nowhere is a typo, named with the nodes that do exist.
    let o = locograph(&["validate", "--set", "nodes.res9.blocks=1"], &[file]);
    let err = text(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("--set nodes.res9.blocks=1: no node `res9`") && err.contains("res3, res4"), "{err}");
}

#[test]
fn a_typo_in_a_path_is_a_located_error_listing_the_keys_there() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = tiny_run_file(dir.path());
    let source = std::fs::read_to_string(&file).expect("read");
    let o = locograph(&["validate", "--set", "train.sede=3"], &[&file]);
    let err = text(&o).replace(&file.display().to_string(), "FILE");
    assert_eq!(o.status.code(), Some(2), "{err}");
    // At the `train:` line, naming the override, the unknown key and the keys that exist.
    assert!(err.contains(&format!("FILE:{}:", line_of(&source, "train:"))), "{err}");
    assert!(err.contains("--set train.sede=3") && err.contains("sede"), "{err}");
    assert!(err.contains("batch_size") && err.contains("log_every"), "{err}");

    // A typo at the top level, a wrong type, a bad value and a path into a number: all at once.
    let o = locograph(
        &[
            "validate",
            "--set",
            "trian.steps=3",
            "--set",
            "train.batch_size=many",
            "--set",
            "name.x=1",
            "--set",
            "seed.x=1",
        ],
        &[&file],
    );
    let err = text(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("4 errors"), "{err}");
    assert!(err.contains("--set trian.steps=3: unknown key `trian`; expected one of:"), "{err}");
    assert!(err.contains("--set train.batch_size=many") && err.contains("invalid type"), "{err}");
    assert!(err.contains("--set name.x=1: `name` is a string, not a mapping"), "{err}");
    // The file has no `seed`: the whole value is the override's, and so is its type error.
    assert!(err.contains("--set seed.x=1: invalid type: map, expected u64"), "{err}");
    // Values are checked after types, with the same attribution.
    let o = locograph(&["validate", "--set", "train.batch_size=1"], &[&file]);
    let err = text(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("--set train.batch_size=1: needs at least 2 images"), "{err}");
    // A malformed override is a usage error before anything is read.
    let o = locograph(&["validate", "--set", "seed"], &[&file]);
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o).contains("expected PATH=VALUE"), "{}", text(&o));
}

#[test]
fn the_run_directory_records_the_overrides() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = tiny_run_file(dir.path());
    let runs = dir.path().join("runs");
    let o = locograph(
        &["run", "--quiet", "--set", "seed=5", "--set", "train.steps=2", "--runs-dir", runs.to_str().expect("utf-8")],
        &[&file],
    );
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let run = std::fs::read_dir(&runs).expect("runs").next().expect("a run").expect("entry").path();
    let config = std::fs::read_to_string(run.join("config.yaml")).expect("config");
    assert!(config.contains("seed: 5") && config.contains("steps: 2"), "{config}");
    let derived: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("derived.json")).expect("derived")).expect("json");
    assert_eq!(derived["overrides"], serde_json::json!(["seed=5", "train.steps=2"]));
    assert_eq!(derived["seed"], 5);
    assert_eq!(derived["total_steps"], 2);
}

#[test]
fn runs_dir_in_the_file_is_relative_to_the_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sub = dir.path().join("exp");
    std::fs::create_dir(&sub).expect("mkdir");
    let file = tiny_run_file(&sub);
    let o = Command::new(env!("CARGO_BIN_EXE_locograph"))
        .args(["run", "--quiet", "--set", "train.runs_dir=out", "--set", "train.steps=1"])
        .arg(&file)
        .current_dir(dir.path())
        .output()
        .expect("run");
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert_eq!(std::fs::read_dir(sub.join("out")).expect("exp/out").count(), 1);
    assert!(!dir.path().join("out").exists());
}

#[test]
fn seeds_write_one_run_each_and_a_summary_that_eval_completes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = tiny_run_file(dir.path());
    let runs = dir.path().join("runs");
    let monitor = "monitor={every: 2, train_images: 16, test_images: 16, k: 3}";
    let runs_dir = runs.to_str().expect("utf-8");
    let o = locograph(&["run", "--quiet", "--seeds", "0,3", "--set", monitor, "--runs-dir", runs_dir], &[&file]);
    let out = text(&o);
    assert_eq!(o.status.code(), Some(0), "{out}");
    let group = std::fs::read_dir(&runs).expect("runs").next().expect("a group").expect("entry").path();
    assert!(group.file_name().expect("name").to_string_lossy().starts_with("tiny-seeds-"), "{}", group.display());
    for (seed, run) in [(0, "seed-0"), (3, "seed-3")] {
        let config = std::fs::read_to_string(group.join(run).join("config.yaml")).expect("config");
        assert!(config.contains(&format!("seed: {seed}")), "{config}");
        assert!(group.join(run).join("weights.safetensors").is_file());
    }
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(group.join("summary.json")).expect("summary")).expect("json");
    assert_eq!(summary["runs"], serde_json::json!(["seed-0", "seed-3"]));
    for loss in ["L1", "L2", "L3"] {
        let s = &summary["at_end"][loss];
        let v: Vec<f64> = s["values"].as_array().expect("values").iter().map(|v| v.as_f64().expect("f64")).collect();
        assert_eq!(v.len(), 2, "{summary}");
        // The two seeds differ, and the summary is their mean and sample std.
        assert_ne!(v[0], v[1]);
        let mean = (v[0] + v[1]) / 2.0;
        assert!((s["mean"].as_f64().expect("mean") - mean).abs() < 1e-9);
        assert!((s["std"].as_f64().expect("std") - (v[0] - v[1]).abs() / 2f64.sqrt()).abs() < 1e-9);
    }
    assert!(out.contains("L1 at the end:") && out.contains("(n = 2)"), "{out}");
    assert_eq!(summary["at_end"]["knn_top1"]["values"].as_array().expect("knn").len(), 2, "{summary}");
    // The group's online kNN curve: the mean of its seeds.
    let fig = dir.path().join("knn.svg");
    let o = locograph(&["plot", "monitor", "--out", fig.to_str().expect("utf-8")], &[]);
    assert_ne!(o.status.code(), Some(0), "no runs given");
    let arg = format!("LoCo={}", group.display());
    let o = locograph(&["plot", "monitor", "--out", fig.to_str().expect("utf-8"), &arg], &[]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let svg = std::fs::read_to_string(&fig).expect("svg");
    assert!(svg.contains("LoCo (mean of 2 seeds)") && svg.contains("kNN top-1"), "{svg}");

    let o = locograph(&["eval", "--protocol", "knn", "--k", "5"], &[&group]);
    let out = text(&o);
    assert_eq!(o.status.code(), Some(0), "{out}");
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(group.join("summary.json")).expect("summary")).expect("json");
    let knn = &summary["eval"]["knn res5"];
    assert_eq!(knn["values"].as_array().expect("values").len(), 2, "{summary}");
    assert!(out.contains("knn res5: top-1") && out.contains("(n = 2)"), "{out}");
    // A protocol that does not exist is refused by the command line, naming the choices.
    let o = locograph(&["eval", "--protocol", "svm"], &[&group]);
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o).contains("linear") && text(&o).contains("knn"), "{}", text(&o));
}

#[test]
fn into_adds_seeds_to_a_group_only_when_they_repeat_its_runs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = tiny_run_file(dir.path());
    let runs = dir.path().join("runs");
    let runs_dir = runs.to_str().expect("utf-8");
    let o = locograph(&["run", "--quiet", "--seeds", "0", "--runs-dir", runs_dir], &[&file]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let group = std::fs::read_dir(&runs).expect("runs").next().expect("a group").expect("entry").path();
    let g = group.to_str().expect("utf-8");
    let o = locograph(&["eval", "--protocol", "knn", "--k", "5"], &[&group]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));

    // A held seed, another override and another length: refused, every problem named at once,
    // and the group untouched.
    let before = std::fs::read_to_string(group.join("seeds.json")).expect("seeds.json");
    let o = locograph(
        &["run", "--quiet", "--seeds", "0,1", "--steps", "6", "--set", "schedule.lr=0.1", "--into", g],
        &[&file],
    );
    let out = text(&o);
    assert_ne!(o.status.code(), Some(0), "{out}");
    for needle in ["--into", "already holds seed(s) [0]", "schedule.lr=0.1", "trained 4 steps, these would train 6"] {
        assert!(out.contains(needle), "{needle} missing in:\n{out}");
    }
    assert_eq!(std::fs::read_to_string(group.join("seeds.json")).expect("seeds.json"), before);
    assert!(!group.join("seed-1").exists());
    // The file edited since (same name): refused, pointing at the run's config.yaml.
    let edited = dir.path().join("edited").join("loco_tiny.yaml");
    std::fs::create_dir_all(edited.parent().expect("parent")).expect("mkdir");
    let text_before = std::fs::read_to_string(&file).expect("file");
    std::fs::write(&edited, text_before.replace("log_every: 2", "log_every: 1")).expect("write");
    let o = locograph(&["run", "--quiet", "--seeds", "1", "--into", g], &[&edited]);
    assert_ne!(o.status.code(), Some(0));
    assert!(text(&o).contains("the experiment differs") && text(&o).contains("config.yaml"), "{}", text(&o));

    // Two more seeds: the group holds three runs; the summary's losses cover all three, its
    // evaluation only once every run has one (`summary` rewrites it after evaluating seed 1 and 2).
    let o = locograph(&["run", "--quiet", "--seeds", "1,2", "--into", g], &[&file]);
    let out = text(&o);
    assert_eq!(o.status.code(), Some(0), "{out}");
    assert!(out.contains("3 of 3 seeds finished"), "{out}");
    let read = |name: &str| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(group.join(name)).expect(name)).expect("json")
    };
    assert_eq!(read("seeds.json")["seeds"], serde_json::json!([0, 1, 2]));
    assert_eq!(read("summary.json")["runs"], serde_json::json!(["seed-0", "seed-1", "seed-2"]));
    assert_eq!(read("summary.json")["at_end"]["L3"]["values"].as_array().expect("L3").len(), 3);
    assert!(read("summary.json")["eval"].get("knn res5").is_none(), "{}", read("summary.json"));
    for seed in ["seed-1", "seed-2"] {
        let o = locograph(&["eval", "--protocol", "knn", "--k", "5"], &[&group.join(seed)]);
        assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    }
    let o = locograph(&["summary"], &[&group]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(text(&o).contains("knn res5: top-1") && text(&o).contains("(n = 3)"), "{}", text(&o));
    assert_eq!(read("summary.json")["eval"]["knn res5"]["values"].as_array().expect("knn").len(), 3);
    // The same seed trained alone in its own group is the same run as in the extended one.
    let alone = dir.path().join("alone");
    let o = locograph(&["run", "--quiet", "--seeds", "2", "--runs-dir", alone.to_str().expect("utf-8")], &[&file]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let other = std::fs::read_dir(&alone).expect("alone").next().expect("a group").expect("entry").path();
    let weights = |g: &Path| std::fs::read(g.join("seed-2").join("weights.safetensors")).expect("weights");
    assert!(weights(&other) == weights(&group), "seed 2 differs between the groups");
    // `--into` says where the runs go: not with `--runs-dir`, and only for `--seeds`.
    let o = locograph(&["run", "--quiet", "--seeds", "3", "--into", g, "--runs-dir", runs_dir], &[&file]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    let o = locograph(&["run", "--quiet", "--into", g], &[&file]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    // A held seed whose run did not finish: the refusal says how to finish it.
    std::fs::remove_file(group.join("seed-1").join("weights.safetensors")).expect("rm");
    let o = locograph(&["run", "--quiet", "--seeds", "1", "--into", g], &[&file]);
    assert_ne!(o.status.code(), Some(0));
    assert!(text(&o).contains("to finish: `locograph resume") && text(&o).contains("seed-1`"), "{}", text(&o));
    // Not a group.
    let o = locograph(&["summary"], &[&group.join("seed-0")]);
    assert_ne!(o.status.code(), Some(0));
    assert!(text(&o).contains("not a seed group"), "{}", text(&o));
}
