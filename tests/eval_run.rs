//! Evaluation of real (tiny) runs trained through the CLI: feature shapes, a frozen encoder,
//! reports, and both figures made from run directories.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::Device;
use locograph::data::Split;
use locograph::eval::features::{self, FeatureOptions};
use locograph::eval::figures::{self, TsneFigureOptions};
use locograph::eval::linear::LinearConfig;
use locograph::eval::report::{self, EvalOptions, Protocol};
use locograph::eval::tsne::TsneConfig;
use locograph::exec::run_dir::open_run;

/// Trains `text` (a `common` experiment) for 4 steps on synthetic data; returns the run dir.
fn tiny_run(root: &Path, name: &str, text: &str) -> PathBuf {
    let text =
        text.replace("train: {batch_size: 4, steps: 1}", "train: {batch_size: 8, steps: 4, log_every: 1}").replace(
            "data: {format: synthetic,",
            "data: {format: synthetic, synthetic: {train_size: 64, test_size: 48, classes: 4, channels: 1, side: 8},",
        );
    let file = root.join(format!("{name}.yaml"));
    std::fs::write(&file, &text).expect("write");
    let runs = root.join("runs").join(name);
    let out = Command::new(env!("CARGO_BIN_EXE_locograph"))
        .args(["run", "--quiet", "--runs-dir"])
        .arg(&runs)
        .arg(&file)
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    std::fs::read_dir(&runs).expect("runs").next().expect("one run").expect("entry").path()
}

#[test]
fn features_have_the_right_shapes_and_do_not_change() {
    let dir = tempfile::tempdir().expect("tempdir");
    let run_dir = tiny_run(dir.path(), "loco", &common::loco());
    let run = open_run(&run_dir, &Device::Cpu).expect("open");
    assert_eq!(features::default_node(&run.plan).expect("node"), "res5");
    let before: Vec<Vec<f32>> = run
        .model
        .params
        .params
        .iter()
        .map(|p| p.var.as_tensor().flatten_all().and_then(|t| t.to_vec1()).expect("param"))
        .collect();
    // batch 10 does not divide 64 or 48: the short last batch must be kept
    let opts = FeatureOptions { batch_size: 10, limit: None };
    let tr = features::extract(&run, "res5", Split::Train, &opts).expect("train features");
    let te = features::extract(&run, "res5", Split::Test, &opts).expect("test features");
    assert_eq!((tr.n, tr.dim, tr.x.len(), tr.labels.len(), tr.num_classes), (64, 16, 64 * 16, 64, 4));
    assert_eq!((te.n, te.dim), (48, 16));
    let res3 = features::extract(&run, "res3", Split::Test, &opts).expect("res3");
    assert_eq!((res3.n, res3.dim), (48, 16));
    let stem =
        features::extract(&run, "stem", Split::Test, &FeatureOptions { batch_size: 7, limit: Some(9) }).expect("stem");
    assert_eq!((stem.n, stem.dim), (9, 8));
    // A decoder's output is a vector already: no pooling.
    let dec = features::extract(&run, "dec1", Split::Test, &opts).expect("decoder");
    assert_eq!(dec.dim, 6);
    // Eval mode, no augmentation, no update: identical numbers on a second call (bitwise), and
    // a different batch size only regroups the same computation.
    let again = features::extract(&run, "res5", Split::Test, &opts).expect("again");
    assert_eq!(te, again);
    let regrouped = features::extract(&run, "res5", Split::Test, &FeatureOptions { batch_size: 48, limit: None })
        .expect("regrouped");
    assert_eq!(te.labels, regrouped.labels);
    let max_diff = te.x.iter().zip(&regrouped.x).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    assert!(max_diff < 1e-4, "batch composition changed features by {max_diff}: BatchNorm not in eval mode?");
    let after: Vec<Vec<f32>> = run
        .model
        .params
        .params
        .iter()
        .map(|p| p.var.as_tensor().flatten_all().and_then(|t| t.to_vec1()).expect("param"))
        .collect();
    assert_eq!(before, after, "feature extraction changed the encoder");

    let e = features::extract(&run, "nope", Split::Test, &opts).expect_err("unknown node").to_string();
    assert!(e.contains("no node `nope`") && e.contains("res5"), "{e}");
    let e = features::extract(&run, "L1", Split::Test, &opts).expect_err("loss node").to_string();
    assert!(e.contains("is a loss"), "{e}");
}

#[test]
fn evaluate_run_writes_reports_and_leaves_weights_alone() {
    let dir = tempfile::tempdir().expect("tempdir");
    let run_dir = tiny_run(dir.path(), "simclr", &common::simclr());
    let weights = std::fs::read(run_dir.join("weights.safetensors")).expect("weights");
    let protocols = [
        Protocol::Linear(LinearConfig { epochs: 5, batch_size: 16, ..LinearConfig::default() }),
        Protocol::from_name("knn").expect("knn"),
    ];
    let out =
        report::evaluate_run(&run_dir, &protocols, &EvalOptions { node: Some("res4".into()), ..Default::default() })
            .expect("evaluate");
    assert_eq!(out.len(), 2);
    for ((path, value), name) in out.iter().zip(["linear", "knn"]) {
        assert_eq!(path, &run_dir.join(format!("eval_{name}_res4.json")));
        let on_disk: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(path).expect("report")).expect("json");
        assert_eq!(&on_disk, value);
        assert_eq!(on_disk["protocol"], name);
        assert_eq!(on_disk["node"], "res4");
        assert_eq!(on_disk["method"], "simclr");
        assert_eq!(on_disk["features"]["train_size"], 64);
        assert_eq!(on_disk["features"]["test_size"], 48);
        let top1 = on_disk["result"]["test_top1"].as_f64().expect("top1");
        assert!((0.0..=1.0).contains(&top1), "{on_disk}");
    }
    assert_eq!(out[0].1["settings"]["epochs"], 5);
    assert_eq!(out[0].1["settings"]["momentum"], 0.0);
    assert_eq!(out[1].1["settings"]["k"], 200);
    assert_eq!(std::fs::read(run_dir.join("weights.safetensors")).expect("weights"), weights);
    // The default node is the encoder output.
    let out = report::evaluate_run(&run_dir, &[Protocol::from_name("knn").expect("knn")], &EvalOptions::default())
        .expect("evaluate");
    assert!(out[0].0.ends_with("eval_knn_res5.json"));
    assert!(Protocol::from_name("svm").is_err());
}

#[test]
fn figures_from_run_directories() {
    let dir = tempfile::tempdir().expect("tempdir");
    let runs: Vec<(String, PathBuf)> = [("SimCLR", common::simclr()), ("GIM", common::gim()), ("LoCo", common::loco())]
        .iter()
        .map(|(label, text)| (label.to_string(), tiny_run(dir.path(), &label.to_lowercase(), text)))
        .collect();

    // Decoders matched by the stage they read: LoCo's L1 and GIM's L3 share the res3 panel.
    let loss_runs: Vec<_> = runs.iter().map(|(l, d)| figures::read_loss_run(d, l).expect("loss run")).collect();
    let loco = &loss_runs[2];
    let stages: Vec<(&str, &str)> = loco.curves.iter().map(|c| (c.loss.as_str(), c.stage.as_str())).collect();
    assert_eq!(stages, [("L1", "res3"), ("L2", "res4"), ("L3", "res5")]);
    assert_eq!(loco.curves[0].points.len(), 4);
    assert_eq!(loco.curves[0].points[3].0, 4.0);
    let panels = figures::loss_panels(&loss_runs, 0.0);
    assert_eq!(panels[1].series[1].points, loco.curves[0].points);
    let titles: Vec<&str> = panels.iter().map(|p| p.title.as_str()).collect();
    assert_eq!(titles, ["decoder on res2", "decoder on res3", "decoder on res4", "decoder on res5"]);
    let res3: Vec<&str> = panels[1].series.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(res3, ["GIM (L3)", "LoCo (L1)"]);
    let res5: Vec<&str> = panels[3].series.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(res5, ["SimCLR (L)", "GIM (L5)", "LoCo (L3)"]);

    let fig = dir.path().join("figures");
    let outs = [fig.join("loss_curves.png"), fig.join("loss_curves.svg")];
    figures::loss_curves(&runs, 0.6, &outs).expect("loss curves");
    let svg = std::fs::read_to_string(&outs[1]).expect("svg");
    assert!(svg.contains("LoCo (L1)") && svg.contains("decoder on res2"));
    assert!(std::fs::read(&outs[0]).expect("png").starts_with(b"\x89PNG"));

    let opts = TsneFigureOptions {
        classes: 4,
        per_class: 6,
        tsne: TsneConfig { perplexity: 5.0, iterations: 300, ..TsneConfig::default() },
        node: None,
    };
    let outs = [fig.join("tsne.png"), fig.join("tsne.svg")];
    figures::tsne_figure(&runs, &opts, &outs).expect("tsne");
    let svg = std::fs::read_to_string(&outs[1]).expect("svg");
    assert!(svg.contains("LoCo (res5)") && svg.contains("class 3"), "{svg}");
    let first = std::fs::read(&outs[0]).expect("png");
    figures::tsne_figure(&runs, &opts, &outs).expect("tsne again");
    assert_eq!(std::fs::read(&outs[0]).expect("png"), first, "the t-SNE figure is not reproducible");
    if let Ok(keep) = std::env::var("LOCOGRAPH_KEEP_FIGURES") {
        for f in ["loss_curves.png", "tsne.png"] {
            std::fs::copy(fig.join(f), Path::new(&keep).join(f)).expect("keep");
        }
    }
}
