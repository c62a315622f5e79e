//! Stage-parallel training with ranks as threads ([`LocalGroup`]): each rank builds and updates
//! only its own nodes, values go forward and cotangents back through the postbox, and
//! - under the exact schedule the weights after a few steps equal one process's, GIM and LoCo,
//!   on 2 and 3 ranks;
//! - under the pipelined schedule LoCo's shared stage gets the upper unit's gradient one step
//!   late, exactly as docs/parallel.md describes (pinned against single-process references),
//!   and the losses still fall on a fixed batch.

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::{Device, Tensor};
use locograph::config::{Loaded, PipelineSchedule, PlacementConfig};
use locograph::dist::postbox::Postbox;
use locograph::dist::{Communicator, LocalGroup};
use locograph::exec::step::{GradsFinal, StepInput, StepState};
use locograph::exec::train::update_when_final;
use locograph::exec::{run_step_with, Hooks, Model, StageRank};
use locograph::graph::{place, Action, Placement, Plan};

mod common;

const SEED: u64 = 7;

/// The batch of step `step`: 4 images, 8 views of 1×8×8, the same on every rank.
fn batch(step: u64) -> StepInput {
    let x = Tensor::arange(0f32, 512.0, &Device::Cpu)
        .and_then(|t| t.reshape((8, 1, 8, 8)))
        .and_then(|t| (t * (0.37 + 0.11 * step as f64))?.sin())
        .expect("batch");
    StepInput::from(&x)
}

/// Every parameter and batch norm statistic by name.
fn weights(model: &Model) -> HashMap<String, Vec<f32>> {
    model
        .params
        .named_tensors()
        .into_iter()
        .map(|(k, t)| (k, t.flatten_all().and_then(|t| t.to_vec1()).expect("weights")))
        .collect()
}

/// `max |a − b| / max |b|` over all tensors (as tests/distributed.rs); the key sets must agree.
fn relative_difference(a: &HashMap<String, Vec<f32>>, b: &HashMap<String, Vec<f32>>) -> f64 {
    let mut ka: Vec<_> = a.keys().collect();
    let mut kb: Vec<_> = b.keys().collect();
    ka.sort();
    kb.sort();
    assert_eq!(ka, kb, "the ranks together hold every parameter exactly once");
    let (mut diff, mut scale) = (0f64, 0f64);
    for (k, va) in a {
        for (x, y) in va.iter().zip(&b[k]) {
            diff = diff.max((x - y).abs() as f64);
            scale = scale.max(y.abs() as f64);
        }
    }
    diff / scale
}

/// `steps` steps in one process, each node updated as soon as its gradients are final.
fn one_process(loaded: &Loaded, plan: &Plan, steps: u64, lr: f64) -> (HashMap<String, Vec<f32>>, Vec<Vec<f32>>) {
    let model = Model::new(plan, SEED, &Device::Cpu).expect("model");
    let mut opt = loaded.experiment.optimizer.build();
    let mut losses = vec![];
    for step in 0..steps {
        let mut update = |f: GradsFinal<'_>| update_when_final(opt.as_mut(), &model, f, lr);
        let out =
            run_step_with(plan, &model, batch(step), Hooks { grads_final: Some(&mut update), ..Hooks::default() })
                .expect("step");
        losses.push(out.losses.iter().map(|l| l.1).collect());
    }
    (weights(&model), losses)
}

/// `steps` steps on `placement.ranks` thread-ranks; every rank's weights together, and rank 0's
/// gathered losses per step.
fn stage_parallel(
    loaded: &Loaded,
    plan: &Plan,
    placement: &Placement,
    schedule: PipelineSchedule,
    steps: u64,
    lr: f64,
) -> (HashMap<String, Vec<f32>>, Vec<Vec<f32>>) {
    let results = LocalGroup::run(placement.ranks, |group: Arc<dyn Communicator>| {
        let rank = group.rank();
        let model = Model::new_on(plan, SEED, &Device::Cpu, &|n| placement.rank(n) == Some(rank)).expect("model");
        let mut opt = loaded.experiment.optimizer.build();
        let mut post = Postbox::open(&group, &Device::Cpu, 2).expect("postbox");
        let mut sr = StageRank::new(plan, placement, rank, schedule).expect("stage rank");
        let mut losses = vec![];
        for step in 0..steps {
            let mut update = |f: GradsFinal<'_>| update_when_final(opt.as_mut(), &model, f, lr);
            let out = sr.step(&model, &mut post, &batch(step), step, Some(&mut update)).expect("stage step");
            if rank == 0 {
                let all = sr.gather_losses(&mut post, step, &out.losses).expect("losses");
                losses.push(all.iter().map(|l| l.1).collect::<Vec<f32>>());
            }
        }
        post.close().expect("close");
        (weights(&model), losses)
    });
    let mut all = HashMap::new();
    let mut losses = vec![];
    for (rank, (w, l)) in results.into_iter().enumerate() {
        if rank == 0 {
            losses = l;
        }
        for (k, v) in w {
            assert!(all.insert(k.clone(), v).is_none(), "{k} on two ranks");
        }
    }
    (all, losses)
}

fn placement(loaded: &Loaded, plan: &Plan, nodes: &[(&str, usize)], ranks: usize) -> Placement {
    let cfg = PlacementConfig { nodes: nodes.iter().map(|&(k, r)| (k.to_string(), r)).collect(), ..Default::default() };
    place(plan, loaded, &cfg, ranks, 8).expect("placement")
}

fn auto(loaded: &Loaded, plan: &Plan, ranks: usize) -> Placement {
    place(plan, loaded, &PlacementConfig::default(), ranks, 8).expect("placement")
}

/// The exact schedule on 2 and 3 ranks (automatic placement, and cuts given by hand that put
/// LoCo's overlap across ranks), GIM and LoCo: after 3 steps every weight equals one process's.
#[test]
fn the_exact_schedule_equals_one_process() {
    for (method, text) in [("gim", common::gim()), ("loco", common::loco())] {
        let (loaded, plan) = common::compiled(&text);
        let (want, want_losses) = one_process(&loaded, &plan, 3, 0.05);
        let init = weights(&Model::new(&plan, SEED, &Device::Cpu).expect("model"));
        assert!(relative_difference(&init, &want) > 1e-3, "{method}: the steps change the weights");
        let placements = [
            ("auto on 2", auto(&loaded, &plan, 2)),
            ("auto on 3", auto(&loaded, &plan, 3)),
            (
                "res4 cut on 2",
                placement(&loaded, &plan, &[("stem", 0), ("res2", 0), ("res3", 0), ("res4", 1), ("res5", 1)], 2),
            ),
            (
                "every cut on 3",
                placement(&loaded, &plan, &[("stem", 0), ("res2", 0), ("res3", 1), ("res4", 2), ("res5", 2)], 3),
            ),
        ];
        for (label, p) in &placements {
            assert!(!p.crossing(&plan).is_empty());
            let (got, losses) = stage_parallel(&loaded, &plan, p, PipelineSchedule::Exact, 3, 0.05);
            let d = relative_difference(&got, &want);
            eprintln!("{method}, {label}: max relative weight difference {d:.2e}");
            assert!(d <= 1e-5, "{method}, {label}: {d:.3e}");
            assert_eq!(losses.len(), 3);
            for (a, b) in losses.iter().flatten().zip(want_losses.iter().flatten()) {
                assert!(
                    (a - b).abs() <= 1e-5 * b.abs().max(1.0),
                    "{method}, {label}: losses {losses:?} vs {want_losses:?}"
                );
            }
        }
    }
}

/// LoCo's cut at res4 on 2 ranks: rank 0 runs stem, res2, res3 (with L1), rank 1 res4, res5 (L2,
/// L3). The cotangent of L2 at res3's output comes back from rank 1; res3's L2 group is its last
/// and parameters-only (the edge res2 → res3 stops L2), so the pipelined schedule holds it over.
fn loco_cut_at_res4() -> (Loaded, Plan, Placement) {
    let (loaded, plan) = common::compiled(&common::loco());
    let p = placement(&loaded, &plan, &[("stem", 0), ("res2", 0), ("res3", 0), ("res4", 1), ("res5", 1)], 2);
    (loaded, plan, p)
}

/// The backward group of `n` that runs last in the plan's order.
fn last_group(plan: &Plan, n: petgraph::graph::NodeIndex) -> Option<usize> {
    plan.order.actions.iter().rev().find_map(|a| match *a {
        Action::Backward { node, group } if node == n => Some(group),
        _ => None,
    })
}

/// The single-process reference of the pipelined schedule, written with the step's primitives
/// and no ranks: every action in order, except that the last backward group of each node in
/// `late` (LoCo's shared stage, its upper unit's loss) takes the cotangent that the node above
/// sent it *in the previous step*, run back through that step's links of the node
/// ([`StepState::defer`]), while this step's links and cotangent wait for the next step.
fn pipelined_reference(loaded: &Loaded, plan: &Plan, late: &[&str], steps: u64, lr: f64) -> HashMap<String, Vec<f32>> {
    let model = Model::new(plan, SEED, &Device::Cpu).expect("model");
    let mut opt = loaded.experiment.optimizer.build();
    let late: Vec<_> = late.iter().map(|id| plan.ids[*id]).collect();
    let mut held: HashMap<usize, (locograph::exec::step::Deferred, Tensor)> = HashMap::new();
    for step in 0..steps {
        let mut update = |f: GradsFinal<'_>| update_when_final(opt.as_mut(), &model, f, lr);
        let mut state = StepState::new(plan, &model);
        for action in &plan.order.actions {
            match *action {
                Action::Forward(n) => state.forward(n, &batch(step)).expect("forward"),
                Action::Backward { node, group } if late.contains(&node) && Some(group) == last_group(plan, node) => {
                    let mut now = state.take_cotangents(node);
                    assert_eq!(now.len(), 1, "one upper-loss cotangent at {}", plan.id(node));
                    let (_, cot) = now.remove(0);
                    let links = state.defer(node, group, held.remove(&node.index()), Some(&mut update)).expect("defer");
                    held.insert(node.index(), (links, cot));
                }
                Action::Backward { node, group } => state.backward(node, group, Some(&mut update)).expect("backward"),
            }
        }
    }
    weights(&model)
}

/// The pipelined schedule's gradients are the documented ones: after one step, res3 has no L2
/// gradient at all (the same weights as one process with L2 stopped before res3); after three,
/// the weights equal the single-process reference that applies each L2 gradient of res3 one step
/// late; and they differ from the exact schedule's.
#[test]
fn the_pipelined_schedule_applies_the_shared_stage_upper_gradient_one_step_late() {
    let (loaded, plan, p) = loco_cut_at_res4();
    let lr = 0.05;
    let (first, _) = stage_parallel(&loaded, &plan, &p, PipelineSchedule::Pipelined, 1, lr);
    let stopped =
        common::loco().replace("{from: res3, to: res4, stop: [L3]}", "{from: res3, to: res4, stop: [L3, L2]}");
    let (sl, sp) = common::compiled(&stopped);
    let (want_first, _) = one_process(&sl, &sp, 1, lr);
    let d = relative_difference(&first, &want_first);
    assert!(d <= 1e-6, "step 0: {d:.3e}");

    let (got, _) = stage_parallel(&loaded, &plan, &p, PipelineSchedule::Pipelined, 3, lr);
    let reference = pipelined_reference(&loaded, &plan, &["res3"], 3, lr);
    let d = relative_difference(&got, &reference);
    eprintln!("pipelined vs its single-process reference: {d:.2e}");
    assert!(d <= 1e-6, "{d:.3e}");
    let (exact, _) = one_process(&loaded, &plan, 3, lr);
    let apart = relative_difference(&got, &exact);
    eprintln!("pipelined vs exact: {apart:.2e}");
    assert!(apart > 1e-4, "the late gradient changes the weights: {apart:.3e}");
}

/// LoCo on 3 ranks cut at res4 and res5: two shared stages (res3 on rank 0, res4 on rank 1)
/// each get their upper unit's gradient one step late, as the reference with both held over.
#[test]
fn the_pipelined_schedule_on_three_ranks_holds_both_shared_stages_over() {
    let (loaded, plan) = common::compiled(&common::loco());
    let p = placement(&loaded, &plan, &[("stem", 0), ("res2", 0), ("res3", 0), ("res4", 1), ("res5", 2)], 3);
    let (got, _) = stage_parallel(&loaded, &plan, &p, PipelineSchedule::Pipelined, 3, 0.05);
    let reference = pipelined_reference(&loaded, &plan, &["res3", "res4"], 3, 0.05);
    assert!(relative_difference(&got, &reference) <= 1e-6);
    let only_res3 = pipelined_reference(&loaded, &plan, &["res3"], 3, 0.05);
    assert!(relative_difference(&got, &only_res3) > 1e-4, "res4's late gradient is visible");
}

/// GIM sends nothing back: its pipelined schedule is its exact schedule, on 3 ranks.
#[test]
fn gim_pipelined_equals_exact() {
    let (loaded, plan) = common::compiled(&common::gim());
    let p = auto(&loaded, &plan, 3);
    let (got, _) = stage_parallel(&loaded, &plan, &p, PipelineSchedule::Pipelined, 3, 0.05);
    let (want, _) = one_process(&loaded, &plan, 3, 0.05);
    assert_eq!(relative_difference(&got, &want), 0.0);
}

/// A cut whose cotangent must go further down (LoCo cut at res3: L1's gradient crosses back from
/// res3 to res2 and on to the stem) cannot be pipelined: a typed error naming the node.
#[test]
fn a_cut_that_sends_gradient_further_down_is_not_pipelined() {
    let (loaded, plan) = common::compiled(&common::loco());
    let p = placement(&loaded, &plan, &[("stem", 0), ("res2", 0), ("res3", 1), ("res4", 1), ("res5", 1)], 2);
    let err = StageRank::new(&plan, &p, 0, PipelineSchedule::Pipelined).err().expect("refused");
    let text = err.to_string();
    assert!(text.contains("`res2`") && text.contains("L1") && text.contains("further down"), "{text}");
    assert!(StageRank::new(&plan, &p, 0, PipelineSchedule::Exact).is_ok());
}

/// On one fixed batch the pipelined LoCo job's losses at least halve.
#[test]
fn pipelined_losses_halve_on_a_fixed_batch() {
    let (loaded, plan, p) = loco_cut_at_res4();
    let steps = 40;
    let results = LocalGroup::run(2, |group: Arc<dyn Communicator>| {
        let rank = group.rank();
        let model = Model::new_on(&plan, SEED, &Device::Cpu, &|n| p.rank(n) == Some(rank)).expect("model");
        let mut opt = loaded.experiment.optimizer.build();
        let mut post = Postbox::open(&group, &Device::Cpu, 2).expect("postbox");
        let mut sr = StageRank::new(&plan, &p, rank, PipelineSchedule::Pipelined).expect("stage rank");
        let mut losses = vec![];
        for step in 0..steps {
            let mut update = |f: GradsFinal<'_>| update_when_final(opt.as_mut(), &model, f, 0.1);
            let out = sr.step(&model, &mut post, &batch(0), step, Some(&mut update)).expect("step");
            if rank == 0 {
                losses.push(sr.gather_losses(&mut post, step, &out.losses).expect("losses"));
            }
        }
        post.close().expect("close");
        losses
    });
    let losses = &results[0];
    let (first, last) = (&losses[0], &losses[losses.len() - 1]);
    eprintln!("first {first:?}\nlast {last:?}");
    assert_eq!(first.len(), 3);
    for (a, b) in first.iter().zip(last) {
        assert_eq!(a.0, b.0);
        assert!(b.1 <= 0.5 * a.1, "{} from {} to {}", plan.id(a.0), a.1, b.1);
    }
}

// ---- `locograph run` with a placement, one process ------------------------------------------

/// `locograph run FILE --quiet --runs-dir DIR` in `dir`; the output and the run directory.
fn run_cli(dir: &std::path::Path, label: &str, text: &str) -> (std::process::Output, std::path::PathBuf) {
    let file = dir.join(format!("{label}.yaml"));
    std::fs::write(&file, text).expect("write");
    let runs = dir.join(label);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_locograph"))
        .args(["run", file.to_str().expect("utf-8"), "--quiet", "--runs-dir", runs.to_str().expect("utf-8")])
        .env("RAYON_NUM_THREADS", "1")
        .output()
        .expect("locograph");
    let run = std::fs::read_dir(&runs).ok().and_then(|mut d| d.next()).and_then(|e| e.ok()).map(|e| e.path());
    (out, run.unwrap_or(runs))
}

fn saved(run: &std::path::Path) -> HashMap<String, Vec<f32>> {
    candle_core::safetensors::load(run.join("weights.safetensors"), &Device::Cpu)
        .expect("weights")
        .into_iter()
        .map(|(k, t)| (k, t.flatten_all().and_then(|t| t.to_vec1()).expect("values")))
        .collect()
}

/// A placement on one rank is the single-process run: the same weights file, bit for bit, and a
/// `ranks.json` with the one rank's measurements; a placement on two ranks refuses one process
/// with a usage error (exit 2) that says how to start it.
#[test]
fn a_one_rank_placement_is_a_plain_run_and_two_ranks_need_mpirun() {
    let tmp = tempfile::tempdir().expect("tmp");
    let text = common::loco()
        .replace("train: {batch_size: 4, steps: 1}", "train: {batch_size: 4, steps: 3}")
        .replace("data: {format: synthetic,", "data: {format: synthetic, synthetic: {channels: 1, side: 8},");
    let (out, plain) = run_cli(tmp.path(), "plain", &text);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let (out, placed) = run_cli(tmp.path(), "placed", &format!("{text}\nplacement: {{by: compute}}\n"));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(relative_difference(&saved(&placed), &saved(&plain)), 0.0);
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(placed.join("ranks.json")).expect("ranks.json")).expect("json");
    assert_eq!(report[0]["steps"], 3);
    assert_eq!(report[0]["idle_s_per_step"], 0.0, "one rank waits for nobody");
    let two = format!("{text}\nplacement: {{nodes: {{stem: 0, res2: 0, res3: 0, res4: 1, res5: 1}}}}\n");
    let (out, _) = run_cli(tmp.path(), "two", &two);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("on 2 ranks, but the job has 1: start it with `mpirun -np 2`"), "{err}");
}
