//! Profile goldens (ResNet-50, Progressive ResNet-50) and every shipped file compiles.

mod common;

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use locograph::exec::{run_step, Model};

use locograph::config::load;
use locograph::eval::profile::profile;
use locograph::graph::{compile, Compiled};

fn compiled(path: &Path) -> Compiled {
    let loaded = match load(path) {
        Ok(l) => l,
        Err(e) => panic!("{}: {e}", path.display()),
    };
    match compile(&loaded) {
        Ok(c) => c,
        Err(e) => panic!("{}: {e}", path.display()),
    }
}

fn files(dir: &str) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join(dir))
        .expect("folder exists")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    v.sort();
    v
}

fn experiment(name: &str) -> Compiled {
    compiled(&Path::new(env!("CARGO_MANIFEST_DIR")).join("experiments").join(name))
}

#[test]
fn every_shipped_experiment_parses_and_compiles() {
    let exps = files("experiments");
    assert!(exps.len() >= 6, "{exps:?}");
    for p in exps {
        compiled(&p);
    }
}

#[test]
fn every_shipped_graph_compiles_inside_an_experiment() {
    // A graph file holds nodes only: wrap it in a one-loss experiment next to it.
    let dir = tempfile::tempdir().expect("tempdir");
    for g in files("graphs") {
        let text = std::fs::read_to_string(&g).expect("readable");
        let nodes: Vec<&str> = text.lines().filter(|l| l.starts_with("  ") && l.contains("op: stage")).collect();
        let last = nodes.last().and_then(|l| l.trim().split(':').next()).expect("a stage");
        let mut edges = String::from("  - {from: input, to: stem}\n");
        let mut prev = "stem".to_string();
        for l in &nodes {
            let id = l.trim().split(':').next().expect("id");
            edges += &format!("  - {{from: {prev}, to: {id}}}\n");
            prev = id.to_string();
        }
        let (ch, size) = if text.contains("kind: imagenet") { (3, 224) } else { (3, 32) };
        let exp = format!(
            "version: 1\nname: t\ninput: {{channels: {ch}, size: {size}}}\nencoder: {}\nnodes:\n  dec: {{op: decoder}}\n  L: {{op: nt_xent}}\nedges:\n{edges}  - {{from: {last}, to: dec}}\n  - {{from: dec, to: L}}\ndata: {{format: synthetic}}\noptimizer: {{kind: sgd}}\nschedule: {{kind: constant, lr: 0.1}}\ntrain: {{batch_size: 2, steps: 1}}\n",
            g.display()
        );
        let p = dir.path().join("exp.yaml");
        std::fs::write(&p, exp).expect("write");
        compiled(&p);
    }
}

#[test]
fn resnet50_has_23_5m_parameters_without_fc_and_4_1_gflops() {
    let p = profile(&experiment("simclr_resnet50_imagenet.yaml"), 224);
    // torchvision resnet50: 25,557,032 parameters, of which the fc holds 2048·1000 + 1000.
    assert_eq!(p.params(), 23_508_032);
    assert_eq!(p.params() + p.fc_params, 25_557_032);
    let g = p.macs() as f64 / 1e9;
    assert!((g - 4.09).abs() < 0.03, "{g} GMACs");
    let out: Vec<Vec<usize>> = p.rows.iter().map(|r| r.output.clone()).collect();
    assert_eq!(out, [vec![256, 56, 56], vec![512, 28, 28], vec![1024, 14, 14], vec![2048, 7, 7]]);
    // The supplementary's memory shares: one feature map per block.
    for (got, want) in p.paper_mem_pct().iter().zip([43.64, 29.09, 21.82, 5.45]) {
        assert!((got - want).abs() < 0.01, "{got} vs {want}");
    }
    for (got, want) in p.macs_pct().iter().zip([19.39, 25.09, 35.80, 19.73]) {
        assert!((got - want).abs() < 1.0, "{got} vs {want}");
    }
}

#[test]
fn presnet50_matches_the_supplementary() {
    let p = profile(&experiment("loco_presnet50_imagenet.yaml"), 224);
    let sides: Vec<usize> = p.rows.iter().map(|r| r.output[1]).collect();
    assert_eq!(sides, [56, 36, 24, 16, 12, 8]);
    let chans: Vec<usize> = p.rows.iter().map(|r| r.output[0]).collect();
    assert_eq!(chans, [56, 96, 576, 1024, 2048, 4096]);
    // Table 1 taken literally gives 3.752 GMACs, not the 4.16 the supplementary states: the
    // paper's res6 share (20.45 %) is 5.5 points above what its own table computes (14.90 %),
    // and no grouping variant we tried (grouped/ungrouped reduce, projection, first expand;
    // res4 at 512 channels, as the memory column suggests) reproduces all six shares. The
    // golden pins the literal architecture; the comparison is in docs/performance.md.
    assert_eq!(p.macs(), 3_751_825_408);
    let ours = [14.87, 16.18, 16.02, 15.93, 14.90, 22.09];
    for ((got, want), paper) in p.macs_pct().iter().zip(ours).zip([13.50, 14.63, 14.77, 16.62, 20.45, 20.04]) {
        assert!((got - want).abs() < 0.01, "FLOPs share {got} vs {want}");
        // Each stage within 15–23 %, the balance the design aims at, and near the paper's.
        assert!((15.0 - 0.2..23.0).contains(got) && (got - paper).abs() < 6.0, "{got} vs the paper's {paper}");
    }
    assert_eq!(p.rows[0].folded, ["stem"]);
}

fn tiny_step(text: &str) -> locograph::exec::StepOutput {
    let (_, c) = common::compiled(text);
    let model = Model::new(&c, 3, &Device::Cpu).expect("model");
    let v: Vec<f32> = (0..8 * 64).map(|i| ((i * 37 % 101) as f32 / 101.0) - 0.5).collect();
    let x = Tensor::from_vec(v, (8, 1, 8, 8), &Device::Cpu).expect("batch");
    run_step(&c, &model, &x).expect("step")
}

#[test]
fn local_methods_hold_less_than_simclr_and_gradients_carry_no_graph() {
    let simclr = tiny_step(&common::simclr());
    let gim = tiny_step(&common::gim());
    let loco = tiny_step(&common::loco());
    assert!(gim.peak_held_bytes < loco.peak_held_bytes, "{} vs {}", gim.peak_held_bytes, loco.peak_held_bytes);
    assert!(loco.peak_held_bytes < simclr.peak_held_bytes, "{} vs {}", loco.peak_held_bytes, simclr.peak_held_bytes);
    // A gradient that still records its op keeps the forward graph (every activation) alive
    // until the step ends: the local methods' saving would vanish.
    for out in [&simclr, &gim, &loco] {
        for g in out.grads.iter().flatten() {
            assert!(!g.track_op(), "a parameter gradient still holds its graph");
        }
    }
}
