//! Placing a local method's units on ranks: automatic placements balance the plan's per-node
//! costs over contiguous runs of stages, the other nodes follow the stage they read, the per-rank
//! costs add up to the plan's, and a bad placement is a located error.

use std::path::Path;

use locograph::config::{load, Balance, PlacementConfig};
use locograph::graph::{compile, place, Plan};

fn experiment(name: &str) -> (locograph::config::Loaded, Plan) {
    let loaded = load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("experiments").join(name)).expect("load");
    let plan = compile(&loaded).expect("compile");
    (loaded, plan)
}

fn by(b: Balance) -> PlacementConfig {
    PlacementConfig { by: b, ..PlacementConfig::default() }
}

#[test]
fn auto_placement_is_contiguous_and_decoders_follow_their_stage() {
    let (loaded, plan) = experiment("loco_presnet50_imagenet.yaml");
    for ranks in [2, 3, 4, 6] {
        for b in [Balance::Compute, Balance::Memory, Balance::Count] {
            let p = place(&plan, &loaded, &by(b), ranks, 32).expect("placement");
            let stages: Vec<usize> = plan
                .order
                .forward_order()
                .into_iter()
                .filter(|&n| plan.graph[n].is_trainable() && plan.id(n).starts_with("res") || plan.id(n) == "stem")
                .filter_map(|n| p.rank(n))
                .collect();
            assert!(stages.windows(2).all(|w| w[0] <= w[1]), "{b:?} on {ranks}: {stages:?} is not contiguous");
            assert_eq!(stages.last(), Some(&(ranks - 1)), "every rank gets a stage");
            // A decoder and its loss run where the stage they read runs.
            for n in plan.graph.node_indices() {
                if let Some(cfg) = &plan.graph[n].config {
                    if matches!(cfg, locograph::config::NodeConfig::Decoder(_)) || cfg.is_loss() {
                        let mut a = n;
                        while !plan.id(a).starts_with("res") {
                            a = plan.producer(a).expect("producer").1;
                        }
                        assert_eq!(p.rank(n), p.rank(a), "{} vs {}", plan.id(n), plan.id(a));
                    }
                }
            }
            assert_eq!(p.rank(plan.input), None, "the batch is read wherever it is needed");
        }
    }
}

#[test]
fn per_rank_costs_add_up_and_traffic_balances() {
    let (loaded, plan) = experiment("loco_resnet50_imagenet.yaml");
    let p = place(&plan, &loaded, &by(Balance::Compute), 2, 32).expect("placement");
    let costs = p.costs(&plan, 32, 4, 1);
    let total_params: f64 = plan.costs.iter().map(|c| (c.params as f64 * 3.0 + c.buffers as f64) * 4.0).sum();
    let params: f64 = costs.iter().map(|c| c.parameters).sum();
    assert!((params - total_params).abs() < 1.0, "{params} vs {total_params}");
    let (sent, received): (f64, f64) = costs.iter().fold((0.0, 0.0), |(s, r), c| (s + c.sent, r + c.received));
    assert!(sent > 0.0 && (sent - received).abs() < 1.0, "{sent} vs {received}");
    // LoCo's ResNet-50 step peaks in L1's backward, with stem, res2 and res3 alive: all on rank 0,
    // which therefore holds what the whole step holds; rank 1 holds about a third of it.
    let whole = plan.held_bytes(32, 4).peak().map_or(0, |x| x.1) as f64;
    assert!((costs[0].activations - whole).abs() <= 8.0, "{costs:?} vs {whole}");
    assert!(costs[1].activations < 0.5 * whole && costs[1].activations > 0.0, "{costs:?} vs {whole}");
    // Compute balance: the busier rank does less than 70 % of the step.
    let macs: Vec<f64> = costs.iter().map(|c| c.macs).collect();
    let max = macs.iter().cloned().fold(0.0, f64::max);
    assert!(max < 0.7 * macs.iter().sum::<f64>(), "{macs:?}");
}

#[test]
fn bad_placements_are_located_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (loaded, plan) =
        with_placement(dir.path(), "gim_resnet18narrow_fmnist.yaml", "{stem: 0, res2: 0, res3: 1, res4: 3, resX: 1}");
    let e = place(&plan, &loaded, loaded.experiment.placement.as_ref().expect("placement"), 2, 8)
        .expect_err("bad")
        .to_string();
    assert!(e.contains("`res4` is placed on rank 3, but the job has 2 ranks"), "{e}");
    assert!(e.contains("no node `resX`"), "{e}");
    assert!(e.contains("`res5` has no rank"), "{e}");
    assert!(e.contains("gim_resnet18narrow_fmnist.yaml:"), "{e}");
}

/// `file`'s text with `placement` appended, loaded and compiled from a temporary directory.
fn with_placement(dir: &Path, file: &str, placement: &str) -> (locograph::config::Loaded, Plan) {
    let src =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("experiments").join(file)).expect("read");
    let text = format!("{src}\nplacement:\n  nodes: {placement}\n")
        .replace("encoder: ../graphs/", &format!("encoder: {}/graphs/", env!("CARGO_MANIFEST_DIR")));
    let path = dir.join(file);
    std::fs::write(&path, &text).expect("write");
    let loaded = load(&path).expect("load");
    let plan = compile(&loaded).expect("compile");
    (loaded, plan)
}

#[test]
fn a_moving_average_runs_with_what_it_averages_and_every_rank_runs_a_node() {
    let dir = tempfile::tempdir().expect("tempdir");
    // BYOL's target res4_t averages res4 (rank 1): placing it on rank 0 is refused, located.
    let (loaded, plan) = with_placement(
        dir.path(),
        "byol_resnet18narrow_fmnist.yaml",
        "{stem: 0, res2: 0, res3: 0, res4: 1, res5: 1, res4_t: 0}",
    );
    let e = place(&plan, &loaded, loaded.experiment.placement.as_ref().expect("placement"), 2, 8)
        .expect_err("ema on another rank")
        .to_string();
    assert!(e.contains("`res4_t` averages `res4`, so it must run on `res4`'s rank"), "{e}");
    assert!(e.contains("byol_resnet18narrow_fmnist.yaml:"), "{e}");
    // Placed with it, it is accepted, and the unplaced targets follow their online nodes.
    let (loaded, plan) = with_placement(
        dir.path(),
        "byol_resnet18narrow_fmnist.yaml",
        "{stem: 0, res2: 0, res3: 0, res4: 1, res5: 1, res4_t: 1}",
    );
    let p = place(&plan, &loaded, loaded.experiment.placement.as_ref().expect("placement"), 2, 8).expect("placement");
    for (t, of) in [("res4_t", "res4"), ("res2_t", "res2"), ("proj_t", "proj")] {
        assert_eq!(p.rank(plan.ids[t]), p.rank(plan.ids[of]), "{t} runs with {of}");
    }
    // Three ranks, all nodes on 0 and 2: rank 1 would idle.
    let (loaded, plan) =
        with_placement(dir.path(), "gim_resnet18narrow_fmnist.yaml", "{stem: 0, res2: 0, res3: 2, res4: 2, res5: 2}");
    let e = place(&plan, &loaded, loaded.experiment.placement.as_ref().expect("placement"), 3, 8)
        .expect_err("idle rank")
        .to_string();
    assert!(e.contains("rank 1 runs no node"), "{e}");
}
