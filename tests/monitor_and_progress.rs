//! The `monitor:` section on a real Fashion-MNIST run (its kNN column appears in metrics.csv
//! and rises), and the progress bars: drawn with throughput and ETA on a terminal, never
//! when stderr is not one, and not with `--quiet`.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use locograph::data::fetch::DEBIAN_FASHION_MNIST;

/// A two-stage SimCLR on Fashion-MNIST (26 k parameters), monitored every 20 steps.
fn experiment(dir: &Path, data: &Path, steps: u64) -> PathBuf {
    let text = format!(
        r#"version: 1
name: monitor_fmnist
input: {{channels: 1, size: 28}}
nodes:
  stem: {{op: stem, kind: small, channels: 16}}
  res2: {{op: stage, block: basic, blocks: 1, channels: 16}}
  res3: {{op: stage, block: basic, blocks: 1, channels: 32, stride: 2}}
  dec: {{op: decoder, mlp: {{depth: 2, hidden: 64, out: 64}}}}
  L: {{op: nt_xent, temperature: 0.5}}
edges:
  - {{from: input, to: stem}}
  - {{from: stem, to: res2}}
  - {{from: res2, to: res3}}
  - {{from: res3, to: dec}}
  - {{from: dec, to: L}}
data:
  format: idx
  path: {}
  augment: {{size: 28, blur: null, normalize: {{mean: [0.286], std: [0.353]}}}}
optimizer: {{kind: adamw, weight_decay: 1.0e-4}}
schedule: {{kind: constant, lr: 0.002}}
train: {{batch_size: 64, steps: {steps}, log_every: 10}}
monitor: {{every: 20, train_images: 1000, test_images: 500, k: 20}}
"#,
        data.display()
    );
    let file = dir.join("monitor_fmnist.yaml");
    std::fs::write(&file, text).expect("write");
    file
}

/// Debian's Fashion-MNIST (.ci/run installs it; without it this test fails, saying so).
fn fashion_mnist() -> PathBuf {
    let dir = PathBuf::from(DEBIAN_FASHION_MNIST);
    assert!(
        dir.join("train-images-idx3-ubyte.gz").exists(),
        "{} is missing: apt-get install dataset-fashion-mnist",
        dir.display()
    );
    dir
}

#[test]
fn monitor_column_appears_and_rises_on_fashion_mnist() {
    let data = fashion_mnist();
    let dir = tempfile::tempdir().expect("tempdir");
    let file = experiment(dir.path(), &data, 40);
    let runs = dir.path().join("runs");
    let out = Command::new(env!("CARGO_BIN_EXE_locograph"))
        .args(["run", "--runs-dir"])
        .arg(&runs)
        .arg(&file)
        .output()
        .expect("run");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    // What a pass costs beside a step, measured in the run itself.
    assert!(stderr.contains("monitor: 2 passes of") && stderr.contains("× a training step of"), "{stderr}");
    let run = std::fs::read_dir(&runs).expect("runs").next().expect("a run").expect("entry").path();
    let csv = std::fs::read_to_string(run.join("metrics.csv")).expect("metrics");
    let mut lines = csv.lines();
    assert_eq!(lines.next(), Some("step,epoch,lr,L,knn_top1,images_per_sec,elapsed_s"));
    let rows: Vec<Vec<&str>> = lines.map(|l| l.split(',').collect()).collect();
    assert_eq!(rows.len(), 4, "{csv}");
    // Measured at steps 20 and 40 only; the other rows leave the column empty.
    assert_eq!((rows[0][0], rows[0][4]), ("10", ""), "{csv}");
    assert_eq!(rows[2][4], "", "{csv}");
    let knn: Vec<f64> = [&rows[1], &rows[3]].iter().map(|r| r[4].parse().expect("a number")).collect();
    assert!(knn.iter().all(|v| (0.1..=1.0).contains(v)), "{knn:?}: above chance (10 classes), at most 1");
    assert!(knn[1] > knn[0] + 0.02, "the online kNN accuracy did not rise: {knn:?}\n{csv}");
}

/// Runs `locograph ARGS` under a pseudo-terminal (`script`, util-linux), returning what the
/// terminal showed.
fn on_a_terminal(args: &str) -> String {
    let bin = env!("CARGO_BIN_EXE_locograph");
    let out = Command::new("script")
        .args(["-qec", &format!("{bin} {args}"), "/dev/null"])
        .output()
        .expect("script (util-linux) runs a command on a pseudo-terminal");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn bars_are_drawn_on_a_terminal_only_and_not_when_quiet() {
    let dir = tempfile::tempdir().expect("tempdir");
    let text = common::simclr()
        .replace("train: {batch_size: 4, steps: 1}", "train: {batch_size: 8, steps: 30, log_every: 5}")
        .replace(
            "data: {format: synthetic,",
            "data: {format: synthetic, synthetic: {train_size: 64, channels: 1, side: 8},",
        );
    let file = dir.path().join("tiny.yaml");
    std::fs::write(&file, text).expect("write");
    let runs = dir.path().join("runs");
    let args = format!("run --runs-dir {} {}", runs.display(), file.display());

    let shown = on_a_terminal(&args);
    assert!(shown.contains("30/30 steps") && shown.contains("ETA") && shown.contains("/s"), "{shown}");
    let quiet = on_a_terminal(&format!("--quiet {args}"));
    assert!(!quiet.contains("ETA") && quiet.contains("done: 30 steps"), "{quiet}");

    // stderr to a pipe: the same run, no bar and no terminal control characters.
    let out = Command::new(env!("CARGO_BIN_EXE_locograph"))
        .args(["run", "--runs-dir"])
        .arg(&runs)
        .arg(&file)
        .env("LOCOGRAPH_LOG", "info")
        .output()
        .expect("run");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(!stderr.contains("ETA") && !stderr.contains('\r') && !stderr.contains("\x1b["), "{stderr}");
    // The log lines are there, whole, one per line.
    assert!(stderr.lines().any(|l| l.contains("INFO") && l.contains("train") && l.contains("step=30")), "{stderr}");
}

#[test]
fn log_lines_are_printed_above_the_bar_not_into_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let text = common::simclr()
        .replace("train: {batch_size: 4, steps: 1}", "train: {batch_size: 8, steps: 20, log_every: 5}")
        .replace(
            "data: {format: synthetic,",
            "data: {format: synthetic, synthetic: {train_size: 64, channels: 1, side: 8},",
        );
    let file = dir.path().join("tiny.yaml");
    std::fs::write(&file, text).expect("write");
    let runs = dir.path().join("runs");
    let shown = on_a_terminal(&format!("run --runs-dir {} {}", runs.display(), file.display()));
    let logged = on_a_terminal_with_log(&format!("run --runs-dir {} {}", runs.display(), file.display()));
    assert!(shown.contains("ETA"), "{shown}");
    // What each terminal row ends up showing: the text after its last carriage return. A log
    // line written into the bar's row would share a row with the bar's text.
    let rows: Vec<&str> =
        logged.split('\n').map(|l| l.split('\r').rfind(|s| !s.trim().is_empty()).unwrap_or(l)).collect();
    let logs = rows.iter().filter(|r| r.contains("INFO")).count();
    assert!(logs >= 4, "expected a log line per logged step:\n{logged}");
    assert!(rows.iter().all(|r| !(r.contains("INFO") && r.contains("ETA"))), "a log line tore the bar:\n{logged}");
}

fn on_a_terminal_with_log(args: &str) -> String {
    let bin = env!("CARGO_BIN_EXE_locograph");
    let out = Command::new("script")
        .args(["-qec", &format!("LOCOGRAPH_LOG=info {bin} {args}"), "/dev/null"])
        .output()
        .expect("script (util-linux) runs a command on a pseudo-terminal");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    String::from_utf8_lossy(&out.stdout).into_owned()
}
