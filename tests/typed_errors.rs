//! The library reports training and checkpoint failures as typed variants with what a caller
//! needs (the loss, the step, the damaged file), each mapped to the README's exit status. The
//! CLI tests (`tests/resume.rs`, `tests/cli_errors.rs`) check the messages users read.

use std::path::Path;

use locograph::config::parse_str;
use locograph::error::exit;
use locograph::exec::train::{resume, train, TrainOptions};
use locograph::exec::{CheckpointError, TrainError};
use locograph::Error;

/// Two losses, a stop edge, 8×8 synthetic images, a checkpoint every 3 steps.
fn experiment(steps: u64, lr: &str) -> String {
    format!(
        r#"version: 1
name: typed
input: {{channels: 1, size: 8}}
nodes:
  stem: {{op: stem, kind: small, channels: 8}}
  res2: {{op: stage, block: basic, blocks: 1, channels: 8}}
  dec1: {{op: decoder, mlp: {{depth: 2, hidden: 8, out: 6}}}}
  L1: {{op: nt_xent, temperature: 0.5}}
  res3: {{op: stage, block: basic, blocks: 1, channels: 16, stride: 2}}
  dec2: {{op: decoder, mlp: {{depth: 2, hidden: 8, out: 6}}}}
  L2: {{op: nt_xent, temperature: 0.5}}
edges:
  - {{from: input, to: stem}}
  - {{from: stem, to: res2}}
  - {{from: res2, to: dec1}}
  - {{from: dec1, to: L1}}
  - {{from: res2, to: res3, stop: [L2]}}
  - {{from: res3, to: dec2}}
  - {{from: dec2, to: L2}}
data: {{format: synthetic, synthetic: {{train_size: 32, channels: 1, side: 8}}, augment: {{size: 8, jitter: null, blur: null, normalize: null}}}}
optimizer: {{kind: sgd, momentum: 0.9}}
schedule: {{kind: constant, lr: {lr}}}
train: {{batch_size: 8, steps: {steps}, log_every: 1, checkpoint_every: 3, threads: 1}}
"#
    )
}

fn quiet(dir: &Path) -> TrainOptions {
    TrainOptions { run_dir: Some(dir.to_path_buf()), quiet: true, ..TrainOptions::default() }
}

fn run(dir: &Path, steps: u64, lr: &str) -> locograph::Result<locograph::exec::train::TrainSummary> {
    let loaded = parse_str(&experiment(steps, lr), &dir.join("typed.yaml")).expect("parse");
    train(&loaded, &quiet(&dir.join("run")))
}

#[test]
fn a_diverging_loss_is_diverged_with_its_loss_and_step() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let err = run(tmp.path(), 20, "1.0e30").expect_err("diverges");
    match &err {
        Error::Train(TrainError::Diverged { loss, step, .. }) => {
            assert!(loss == "L1" || loss == "L2", "{loss}");
            assert!(*step < 20, "{step}");
        }
        // An update can overflow a weight while the loss is still finite: the save refuses it.
        Error::Train(TrainError::NonFiniteParameter { step, .. }) => assert!(*step < 20),
        other => panic!("not a divergence: {other:?}"),
    }
    assert_eq!(err.exit_code(), exit::DIVERGED);
}

#[test]
fn checkpoint_problems_are_typed() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("run");
    run(tmp.path(), 6, "0.01").expect("train");

    // Not a run directory.
    let err = resume(&tmp.path().join("nowhere"), &quiet(&dir)).expect_err("no run");
    assert!(matches!(&err, Error::Checkpoint(c) if matches!(**c, CheckpointError::NotARunDir { .. })), "{err:?}");
    assert_eq!(err.exit_code(), exit::USAGE);

    // A damaged newest checkpoint, with an older one beside it.
    let w = dir.join("checkpoints/step-00000006/weights.safetensors");
    let bytes = std::fs::read(&w).expect("read");
    std::fs::write(&w, &bytes[..bytes.len() / 2]).expect("truncate");
    let opts = TrainOptions { steps: Some(9), ..quiet(&dir) };
    let err = resume(&dir, &opts).expect_err("damaged");
    match &err {
        Error::Checkpoint(c) => match &**c {
            CheckpointError::Damaged { dir: d, file, older, .. } => {
                assert!(d.ends_with("step-00000006"), "{d:?}");
                assert_eq!(file, "weights.safetensors");
                assert!(*older, "step 3's checkpoint is older");
            }
            other => panic!("{other:?}"),
        },
        other => panic!("{other:?}"),
    }
    assert_eq!(err.exit_code(), exit::OTHER);
    std::fs::write(&w, &bytes).expect("restore");

    // Another graph under the same run directory.
    let cfg = dir.join("config.yaml");
    let text = std::fs::read_to_string(&cfg).expect("config");
    std::fs::write(&cfg, text.replace("channels: 16", "channels: 24")).expect("write");
    let err = resume(&dir, &opts).expect_err("graph changed");
    match &err {
        Error::Checkpoint(c) => match &**c {
            CheckpointError::GraphChanged { was, now, mismatch, .. } => {
                assert_ne!(was, now);
                assert!(mismatch.as_deref().is_some_and(|m| m.contains("res3.")), "{mismatch:?}");
            }
            other => panic!("{other:?}"),
        },
        other => panic!("{other:?}"),
    }
    assert_eq!(err.exit_code(), exit::USAGE);

    // Another seed.
    std::fs::write(&cfg, text.replace("seed: 0", "seed: 7")).expect("write");
    let err = resume(&dir, &opts).expect_err("seed changed");
    assert!(
        matches!(&err, Error::Checkpoint(c) if matches!(**c, CheckpointError::SeedChanged { now: 7, was: 0, .. })),
        "{err:?}"
    );
    std::fs::write(&cfg, &text).expect("restore");
    resume(&dir, &opts).expect("the intact run resumes");
}

#[test]
fn a_dataset_smaller_than_a_batch_is_a_data_error() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let text = experiment(6, "0.01").replace("train_size: 32", "train_size: 4");
    let loaded = parse_str(&text, &tmp.path().join("typed.yaml")).expect("parse");
    let err = train(&loaded, &quiet(&tmp.path().join("run"))).expect_err("too small");
    assert!(matches!(err, Error::Train(TrainError::DatasetTooSmall { images: 4, batch_size: 8, .. })), "{err:?}");
    assert_eq!(err.exit_code(), exit::DATA);
}

/// Data parallel with a batch the ranks share unevenly: NT-Xent weights each rank's share (the
/// ranks' mean gradient is the whole batch's, `tests/distributed.rs`), a loss that averages
/// over a rank's own images cannot, so such a job is refused before anything is built — on
/// every rank alike. An even split is accepted.
#[test]
fn uneven_shares_are_refused_for_losses_that_average_per_rank() {
    use locograph::dist::LocalGroup;
    use locograph::exec::setup::Setup;
    let dir = tempfile::tempdir().expect("tempdir");
    let nt_xent = experiment(1, "0.1");
    let neg_cosine = nt_xent.replace("L2: {op: nt_xent, temperature: 0.5}", "L2: {op: neg_cosine}").replace(
        "  - {from: dec2, to: L2}\n",
        "  - {from: dec2, to: L2, as: prediction}\n  - {from: dec1, to: L2, as: target}\n",
    );
    assert_ne!(neg_cosine, nt_xent);
    let setup = |text: &str, batch: usize, ranks: usize| -> Vec<locograph::Result<()>> {
        let text = text.replace("batch_size: 8", &format!("batch_size: {batch}"));
        let loaded = parse_str(&text, &dir.path().join("shares.yaml")).expect("parse");
        LocalGroup::run(ranks, |g| Setup::new_in(&loaded, Some(1), None, g).map(|_| ()))
    };
    for r in setup(&neg_cosine, 8, 3) {
        let err = r.expect_err("8 images over 3 ranks with a neg_cosine loss");
        assert!(
            matches!(&err, Error::Train(TrainError::UnevenShares { batch_size: 8, ranks: 3, loss, op: "neg_cosine" }) if loss == "L2"),
            "{err:?}"
        );
        assert_eq!(err.exit_code(), exit::USAGE);
    }
    for r in setup(&neg_cosine, 9, 3).into_iter().chain(setup(&nt_xent, 8, 3)) {
        r.expect("an even split, or NT-Xent alone, trains");
    }
}
