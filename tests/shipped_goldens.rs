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
