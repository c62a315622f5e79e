//! Golden `explain` results for the shipped experiment files.

use std::path::Path;

use locograph::config::load;
use locograph::graph::compile;
use locograph::graph::explain::summary;

fn summary_of(file: &str) -> Vec<String> {
    let loaded = load(Path::new(file)).unwrap_or_else(|e| panic!("{e}"));
    let c = compile(&loaded).unwrap_or_else(|e| panic!("{e}"));
    summary(&c)
}

fn expect(file: &str, want: &[&str]) {
    let got = summary_of(file);
    assert_eq!(got, want, "{file}");
}

#[test]
fn simclr_every_stage_by_l() {
    for f in [
        "experiments/simclr_resnet18_fmnist.yaml",
        "experiments/simclr_resnet18narrow_fmnist.yaml",
        "experiments/simclr_resnet18_cifar10.yaml",
        "experiments/simclr_resnet18_stl10.yaml",
    ] {
        expect(f, &["stem <- L", "res2 <- L", "res3 <- L", "res4 <- L", "res5 <- L", "dec <- L"]);
    }
}

#[test]
fn gim_each_stage_by_its_own_loss() {
    for f in [
        "experiments/gim_resnet18_fmnist.yaml",
        "experiments/gim_resnet18narrow_fmnist.yaml",
        "experiments/gim_resnet18_cifar10.yaml",
        "experiments/gim_resnet18_stl10.yaml",
    ] {
        expect(
            f,
            &[
                "stem <- L2",
                "res2 <- L2",
                "dec2 <- L2",
                "res3 <- L3",
                "dec3 <- L3",
                "res4 <- L4",
                "dec4 <- L4",
                "res5 <- L5",
                "dec5 <- L5",
            ],
        );
    }
}

#[test]
fn loco_shared_stages_get_two_losses() {
    for f in [
        "experiments/loco_resnet18_fmnist.yaml",
        "experiments/loco_resnet18narrow_fmnist.yaml",
        "experiments/loco_resnet18_cifar10.yaml",
        "experiments/loco_resnet18_stl10.yaml",
    ] {
        expect(
            f,
            &[
                "stem <- L1",
                "res2 <- L1",
                "res3 <- L1 + L2",
                "dec1 <- L1",
                "res4 <- L2 + L3",
                "dec2 <- L2",
                "res5 <- L3",
                "dec3 <- L3",
            ],
        );
    }
}

#[test]
fn dgl_each_stage_by_its_own_classifier() {
    expect(
        "experiments/dgl_resnet18narrow_fmnist.yaml",
        &[
            "stem <- CE2",
            "res2 <- CE2",
            "aux2 <- CE2",
            "res3 <- CE3",
            "aux3 <- CE3",
            "res4 <- CE4",
            "aux4 <- CE4",
            "res5 <- CE5",
            "aux5 <- CE5",
        ],
    );
}

#[test]
fn infopro_each_module_by_reconstruction_and_classification() {
    expect(
        "experiments/infopro_resnet18narrow_fmnist.yaml",
        &[
            "stem <- R2",
            "res2 <- R2",
            "rec2 <- R2",
            "res3 <- R3 + CE3",
            "rec3 <- R3",
            "aux3 <- CE3",
            "res4 <- CE4",
            "aux4 <- CE4",
            "res5 <- CE5",
            "fc <- CE5",
        ],
    );
}

/// SimSiam and BYOL: one loss trains the whole online side; the target (SimSiam's stopped
/// projection, BYOL's moving averages) is trained by nothing.
#[test]
fn simsiam_and_byol_train_the_online_side_only() {
    let online = ["stem <- D", "res2 <- D", "res3 <- D", "res4 <- D", "res5 <- D", "proj <- D", "pred <- D"];
    expect("experiments/simsiam_resnet18narrow_fmnist.yaml", &online);
    expect("experiments/byol_resnet18narrow_fmnist.yaml", &online);
    let loaded = load(Path::new("experiments/byol_resnet18narrow_fmnist.yaml")).unwrap_or_else(|e| panic!("{e}"));
    let c = compile(&loaded).unwrap_or_else(|e| panic!("{e}"));
    let averages: Vec<String> = c
        .graph
        .node_weights()
        .filter_map(|n| {
            n.ema.as_ref().map(|e| format!("{} = ema({}, {} → {})", n.id, e.of, e.momentum, e.final_momentum))
        })
        .collect();
    assert_eq!(
        averages,
        [
            "stem_t = ema(stem, 0.996 → 1)",
            "res2_t = ema(res2, 0.996 → 1)",
            "res3_t = ema(res3, 0.996 → 1)",
            "res4_t = ema(res4, 0.996 → 1)",
            "res5_t = ema(res5, 0.996 → 1)",
            "proj_t = ema(proj, 0.996 → 1)",
        ]
    );
    // SimSiam's stop: the target edge blocks D, so the projection gets D's gradient only through
    // the predictor.
    let loaded = load(Path::new("experiments/simsiam_resnet18narrow_fmnist.yaml")).unwrap_or_else(|e| panic!("{e}"));
    let c = compile(&loaded).unwrap_or_else(|e| panic!("{e}"));
    let stopped: Vec<String> =
        c.graph.edge_indices().filter(|&e| !c.graph[e].stop.is_none()).map(|e| c.edge_name(e)).collect();
    assert_eq!(stopped, ["proj -> D"]);
}

/// ShuffleNet v2-50's SimCLR, GIM and LoCo files route like the ResNet-50 ones.
#[test]
fn shufflenet_v2_50_files_route_like_resnet50() {
    expect(
        "experiments/simclr_shufflenetv2_50_imagenet.yaml",
        &["stem <- L", "stage2 <- L", "stage3 <- L", "stage4 <- L", "stage5 <- L", "dec <- L"],
    );
    expect(
        "experiments/gim_shufflenetv2_50_imagenet.yaml",
        &[
            "stem <- L2",
            "stage2 <- L2",
            "dec2 <- L2",
            "stage3 <- L3",
            "dec3 <- L3",
            "stage4 <- L4",
            "dec4 <- L4",
            "stage5 <- L5",
            "dec5 <- L5",
        ],
    );
    expect(
        "experiments/loco_shufflenetv2_50_imagenet.yaml",
        &[
            "stem <- L1",
            "stage2 <- L1",
            "stage3 <- L1 + L2",
            "dec1 <- L1",
            "stage4 <- L2 + L3",
            "dec2 <- L2",
            "stage5 <- L3",
            "dec3 <- L3",
        ],
    );
}

/// The ready CIFAR-10 and STL-10 experiments: each validates (keys, graph, values) and opens
/// with the published number it approaches.
#[test]
fn cifar10_and_stl10_experiments_validate_and_name_their_published_number() {
    for m in ["simclr", "gim", "loco"] {
        for ds in ["cifar10", "stl10"] {
            let file = format!("experiments/{m}_resnet18_{ds}.yaml");
            let loaded = load(Path::new(&file)).unwrap_or_else(|e| panic!("{e}"));
            locograph::exec::validate(&loaded).unwrap_or_else(|e| panic!("{file}: {e}"));
            let text = std::fs::read_to_string(&file).expect("read");
            let head: Vec<&str> = text.lines().take_while(|l| l.starts_with('#')).collect();
            assert!(head.iter().any(|l| l.contains("Published:")), "{file} opens with no published number");
            assert_eq!(loaded.experiment.name, format!("{m}_resnet18_{ds}"));
            assert!(loaded.experiment.monitor.is_some(), "{file}: no online kNN");
        }
    }
}
