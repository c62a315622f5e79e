//! The shipped DGL, InfoPro, SimSiam and BYOL experiments train on real Fashion-MNIST (Debian's
//! `dataset-fashion-mnist`, installed by .ci/run): each file as shipped, with a smaller budget
//! (256 images, batch 16, 24 steps), and each local objective must fall.

use std::path::{Path, PathBuf};

use locograph::exec::train::{train, TrainOptions};

const FMNIST: &str = "/usr/share/datasets/fashion-mnist";

/// The shipped file with the data read from the installed package and a smoke budget.
fn smoke_file(name: &str, dir: &Path) -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(root.join("experiments").join(name)).expect("shipped file");
    let graph = root.join("graphs/resnet18_narrow.yaml");
    let edits = [
        ("encoder: ../graphs/resnet18_narrow.yaml", format!("encoder: {}", graph.display())),
        ("path: ../data/fashion-mnist", format!("path: {FMNIST}")),
        ("  split: train ", "  limit: 256\n  split: train ".to_string()),
        ("batch_size: 128", "batch_size: 16".to_string()),
        ("steps: 500", "steps: 24".to_string()),
        ("log_every: 10", "log_every: 1".to_string()),
    ];
    let mut edited = text.clone();
    for (from, to) in edits {
        assert!(edited.contains(from), "{name} has no `{from}`");
        edited = edited.replacen(from, &to, 1);
    }
    let file = dir.join(name);
    std::fs::write(&file, edited).expect("write");
    file
}

/// Each loss's mean over the first and the last six logged steps.
fn falls(name: &str) -> Vec<(String, f32, f32)> {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = smoke_file(name, dir.path());
    let loaded = locograph::config::load(&file).unwrap_or_else(|e| panic!("{e}"));
    let run = dir.path().join("run");
    let opts = TrainOptions { quiet: true, run_dir: Some(run.clone()), ..Default::default() };
    let summary = train(&loaded, &opts).unwrap_or_else(|e| panic!("{name}: {e}"));
    assert_eq!(summary.steps, 24);
    let csv = std::fs::read_to_string(run.join("metrics.csv")).expect("metrics");
    let mut lines = csv.lines();
    let head: Vec<&str> = lines.next().expect("header").split(',').collect();
    let rows: Vec<Vec<f32>> = lines.map(|l| l.split(',').map(|v| v.parse().unwrap_or(f32::NAN)).collect()).collect();
    assert_eq!(rows.len(), 24, "{csv}");
    let losses: Vec<usize> = (0..head.len())
        .filter(|&i| !["step", "epoch", "lr", "images_per_sec", "elapsed_s"].contains(&head[i]))
        .collect();
    assert!(!losses.is_empty(), "{head:?}");
    losses
        .into_iter()
        .map(|i| {
            let mean = |r: &[Vec<f32>]| r.iter().map(|row| row[i]).sum::<f32>() / r.len() as f32;
            let (a, b) = (mean(&rows[..6]), mean(&rows[18..]));
            println!("{name} {}: {a:.4} → {b:.4}", head[i]);
            assert!(a.is_finite() && b.is_finite(), "{name} {}: {a} → {b}", head[i]);
            (head[i].to_string(), a, b)
        })
        .collect()
}

fn installed() -> bool {
    let ok = Path::new(FMNIST).join("train-labels-idx1-ubyte.gz").exists();
    if !ok {
        if std::env::var_os("CI").is_some() {
            panic!("{FMNIST} is missing in CI (apt-get install dataset-fashion-mnist)");
        }
        eprintln!("note: skipped: {FMNIST} not installed (apt-get install dataset-fashion-mnist)");
    }
    ok
}

/// The weighted sum of each group of losses (one local module's objective) falls.
fn objectives_fall(name: &str, modules: &[&[(&str, f32)]]) {
    let got = falls(name);
    let value =
        |id: &str| got.iter().find(|(l, ..)| l == id).map(|&(_, a, b)| (a, b)).unwrap_or_else(|| panic!("{id}"));
    assert_eq!(got.len(), modules.iter().map(|m| m.len()).sum::<usize>(), "{got:?}");
    for module in modules {
        let (a, b) = module.iter().fold((0.0, 0.0), |(a, b), &(id, w)| (a + w * value(id).0, b + w * value(id).1));
        assert!(b < a, "{name} {module:?}: {a} → {b} did not fall");
    }
    // A 10-way cross-entropy starts near ln 10.
    for (loss, a, _) in got.iter().filter(|(l, ..)| l.starts_with("CE")) {
        assert!((a - 10f32.ln()).abs() < 1.0, "{name} {loss} starts at {a}");
    }
}

#[test]
fn dgl_and_infopro_local_objectives_fall_on_fashion_mnist() {
    if !installed() {
        return;
    }
    objectives_fall(
        "dgl_resnet18narrow_fmnist.yaml",
        &[&[("CE2", 1.0)], &[("CE3", 1.0)], &[("CE4", 1.0)], &[("CE5", 1.0)]],
    );
    objectives_fall(
        "infopro_resnet18narrow_fmnist.yaml",
        &[&[("R2", 1.0)], &[("R3", 0.5), ("CE3", 0.5)], &[("CE4", 1.0)], &[("CE5", 1.0)]],
    );
}

#[test]
fn simsiam_and_byol_losses_fall_on_fashion_mnist() {
    if !installed() {
        return;
    }
    for name in ["simsiam_resnet18narrow_fmnist.yaml", "byol_resnet18narrow_fmnist.yaml"] {
        let got = falls(name);
        assert_eq!(got.len(), 1, "{got:?}");
        let (loss, a, b) = &got[0];
        // Minus a cosine: in [−1, 1], falling towards −1.
        assert!(b < a && *b >= -1.0 && *a <= 1.0, "{name} {loss}: {a} → {b}");
    }
}
