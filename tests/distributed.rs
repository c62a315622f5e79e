//! The distributed layer under real MPI: `mpirun -np 2` and `-np 3` on `locograph-dist-check`
//! (built with `--features mpi`; this test exists only in that build). Needs OpenMPI's
//! `mpirun` on the PATH (`.ci/run` installs it): without it these tests fail, they do not skip.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

mod common;

fn mpirun(ranks: usize, args: &[&str]) -> (Output, Duration) {
    let t = Instant::now();
    let out = Command::new("mpirun")
        // Root in CI containers; more ranks than the 2 cores.
        .args(["--allow-run-as-root", "--oversubscribe", "-np", &ranks.to_string()])
        .arg(env!("CARGO_BIN_EXE_locograph-dist-check"))
        .args(args)
        // One thread per rank: the ranks share 2 cores.
        .env("RAYON_NUM_THREADS", "1")
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run mpirun (install OpenMPI: apt-get install openmpi-bin libopenmpi-dev): {e}")
        });
    (out, t.elapsed())
}

fn output_text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// Every check (collectives; NT-Xent global and local against one process, f64 ≤ 1e-10; sync
/// batch norm; the reducer's exact mean; sharded data) passes on every rank, with shares that
/// are even (6 images on 2 and 3 ranks) and uneven (7).
#[test]
fn every_check_passes_on_two_and_three_ranks() {
    for (ranks, images) in [(2, 6), (2, 7), (3, 6), (3, 7)] {
        let (out, _) = mpirun(ranks, &["checks", "--images", &images.to_string()]);
        let all = output_text(&out);
        assert!(out.status.success(), "{ranks} ranks, {images} images:\n{all}");
        for rank in 0..ranks {
            for check in ["collectives", "nt_xent", "batch_norm", "reducer", "shard"] {
                let line = format!("rank {rank} of {ranks}: {check} ok");
                let want = if check == "nt_xent" { 2 } else { 1 };
                assert_eq!(all.matches(&line).count(), want, "`{line}` in:\n{all}");
            }
        }
    }
}

/// A rank that fails while the others wait in an all-reduce ends the whole job within seconds,
/// non-zero, with the rank and the cause on stderr.
#[test]
fn a_failing_rank_ends_the_job_naming_itself() {
    let (out, took) = mpirun(3, &["fail", "--rank", "1", "--after", "3"]);
    let all = output_text(&out);
    assert!(!out.status.success(), "{all}");
    assert!(all.contains("rank 1 of 3: train-images-idx3-ubyte: at byte 16: truncated"), "{all}");
    assert!(took < Duration::from_secs(30), "took {took:?}:\n{all}");
}

/// A panic on one rank ends the job too (unwinding would finalise MPI and wait forever).
#[test]
fn a_panicking_rank_ends_the_job() {
    let (out, took) = mpirun(2, &["panic", "--rank", "0", "--after", "2"]);
    let all = output_text(&out);
    assert!(!out.status.success(), "{all}");
    assert!(all.contains("a simulated bug") && all.contains("rank 0 of 2: panicked"), "{all}");
    assert!(took < Duration::from_secs(30), "took {took:?}:\n{all}");
}

/// A rank killed with SIGKILL mid-run: `mpirun` ends the job, non-zero, naming the rank, within
/// seconds; nobody hangs in the collective the dead rank never joins.
#[test]
fn a_killed_rank_ends_the_job() {
    let (out, took) = mpirun(2, &["kill", "--rank", "1", "--after", "3"]);
    let all = output_text(&out);
    assert!(!out.status.success(), "{all}");
    assert!(all.contains("rank 1") && all.to_lowercase().contains("signal 9"), "{all}");
    assert!(took < Duration::from_secs(30), "took {took:?}:\n{all}");
}

// ---- `locograph run` / `resume` under mpirun ----------------------------------------------

const LOCOGRAPH: &str = env!("CARGO_BIN_EXE_locograph");

/// A tiny experiment (common::tiny's encoder, synthetic data) with `batch` images per step,
/// `steps` steps, decoders with batch norm in their MLP (synchronised too). The learning rate
/// is small so that rounding differences stay rounding differences over a few steps: this
/// encoder's last stages normalise few values per channel (res5 is 1×1), where a ReLU that
/// flips on a rounding difference moves a batch norm's gradient by a visible fraction (at lr
/// 0.02, 12 images on 3 ranks part from one process at the 4th step, with nothing but rounding
/// between them: the losses agree to 1e-5 before).
fn experiment(method: &str, batch: usize, steps: u64, extra_train: &str) -> String {
    let text = match method {
        "simclr" => common::simclr(),
        "gim" => common::gim(),
        "loco" => common::loco(),
        m => panic!("no method {m}"),
    };
    text.replace("mlp: {depth: 2, hidden: 8, out: 6}", "mlp: {depth: 2, hidden: 8, out: 6, batch_norm: true}")
        .replace("data: {format: synthetic,", "data: {format: synthetic, synthetic: {channels: 1, side: 8},")
        .replace("lr: 0.1}", "lr: 0.005}")
        .replace(
            "train: {batch_size: 4, steps: 1}",
            &format!("train: {{batch_size: {batch}, steps: {steps}{extra_train}}}"),
        )
}

/// Runs `locograph ARGS` on `ranks` ranks (0: one process, no mpirun) in `dir`; the output.
fn locograph(ranks: usize, dir: &Path, args: &[&str]) -> Output {
    locograph_with(ranks, dir, args, &[])
}

/// [`locograph`] with extra environment variables.
fn locograph_with(ranks: usize, dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = if ranks == 0 {
        Command::new(LOCOGRAPH)
    } else {
        let mut c = Command::new("mpirun");
        c.args(["--allow-run-as-root", "--oversubscribe", "-np", &ranks.to_string(), LOCOGRAPH]);
        c
    };
    cmd.args(args).current_dir(dir).env("RAYON_NUM_THREADS", "1").envs(env.iter().copied());
    cmd.output().unwrap_or_else(|e| panic!("cannot run (is OpenMPI installed?): {e}"))
}

/// Trains `text` on `ranks` ranks into `dir/<label>`; the run directory.
fn train(text: &str, ranks: usize, dir: &Path, label: &str) -> PathBuf {
    train_with(text, ranks, dir, label, &[])
}

/// [`train`] with extra environment variables.
fn train_with(text: &str, ranks: usize, dir: &Path, label: &str, env: &[(&str, &str)]) -> PathBuf {
    let file = dir.join(format!("{label}.yaml"));
    std::fs::write(&file, text).expect("write experiment");
    let runs = dir.join(label);
    let out = locograph_with(
        ranks,
        dir,
        &["run", file.to_str().expect("utf-8"), "--quiet", "--runs-dir", runs.to_str().expect("utf-8")],
        env,
    );
    assert!(out.status.success(), "{label} on {ranks} ranks:\n{}", output_text(&out));
    std::fs::read_dir(&runs).expect("runs dir").next().expect("one run").expect("entry").path()
}

/// `max |a − b| / max |b|` over every tensor of two runs' weights together (parameters and
/// batch norm statistics). Per tensor it would be relative to the tensor's own scale, and the
/// batch norm shifts start at 0: after a few small steps their whole value is a few updates,
/// and the ratio measures the rounding of those updates rather than of the weights.
fn weights_diff(a: &Path, b: &Path) -> f64 {
    let load = |p: &Path| {
        candle_core::safetensors::load(p.join("weights.safetensors"), &candle_core::Device::Cpu).expect("weights")
    };
    let (wa, wb) = (load(a), load(b));
    assert_eq!(wa.len(), wb.len());
    let (mut diff, mut scale): (f64, f64) = (0.0, 0.0);
    for (k, ta) in &wa {
        let tb = &wb[k];
        diff = diff.max(ta.sub(tb).and_then(|d| d.abs()?.max_all()?.to_scalar::<f32>()).expect("diff") as f64);
        scale = scale.max(tb.abs().and_then(|t| t.max_all()?.to_scalar::<f32>()).expect("scale") as f64);
    }
    diff / scale
}

/// SimCLR, GIM and LoCo for a few steps on 2 ranks (6 images: shares of 3) and 3 ranks (7
/// images: shares of 3, 2, 2) with global negatives and synchronised batch norm: the weights
/// (and running statistics) equal one process's on the same global batches.
///
/// To 1e-5 on locograph's im2col kernels, which compute each image's outputs in the same order
/// whatever the batch. oneDNN picks its kernels' blocking by batch size, so a rank's share (3
/// images) and the whole batch round differently from the first forward on, and batch norm over
/// 6 values per channel (this toy's 2×2 res4) amplifies that over three steps: measured up to
/// 6.8e-4 (SimCLR, 2 ranks; the other cases ≤ 1e-6). Its bound is looser; a wrong distributed
/// step (local negatives, unsynchronised batch norm) differs by more than 1e-3
/// (`local_negatives_and_unsynchronised_batch_norm_differ_from_one_process`).
#[test]
fn training_on_two_and_three_ranks_equals_one_process() {
    let tmp = tempfile::tempdir().expect("tmp");
    for (kernels, env, bound) in [("im2col", &[("LOCOGRAPH_DNNL", "0")][..], 1e-5), ("default", &[][..], 1e-3)] {
        for method in ["simclr", "gim", "loco"] {
            for (ranks, batch) in [(2, 6), (3, 7)] {
                let text = experiment(method, batch, 3, "");
                let label = format!("{kernels}-{method}-{batch}");
                let one = train_with(&text, 0, tmp.path(), &format!("{label}-one"), env);
                let many = train_with(&text, ranks, tmp.path(), &format!("{label}-{ranks}"), env);
                let d = weights_diff(&many, &one);
                eprintln!("{kernels}: {method}, {ranks} ranks, batch {batch}: max relative weight difference {d:.2e}");
                assert!(d <= bound, "{kernels}: {method} on {ranks} ranks differs from one process by {d:.3e}");
            }
        }
    }
}

/// With `negatives: local` (each rank's anchors see only its own rows) or without synchronised
/// batch norm, 2 ranks train something else than one process: the differences are far above
/// the rounding of the parity test.
#[test]
fn local_negatives_and_unsynchronised_batch_norm_differ_from_one_process() {
    let tmp = tempfile::tempdir().expect("tmp");
    let text = experiment("simclr", 6, 3, "");
    let one = train(&text, 0, tmp.path(), "one");
    let local =
        text.replace("L: {op: nt_xent, temperature: 0.5}", "L: {op: nt_xent, temperature: 0.5, negatives: local}");
    assert_ne!(local, text);
    let d_local = weights_diff(&train(&local, 2, tmp.path(), "local"), &one);
    let unsynced = experiment("simclr", 6, 3, ", sync_batch_norm: false");
    let d_bn = weights_diff(&train(&unsynced, 2, tmp.path(), "unsynced"), &one);
    eprintln!("local negatives: {d_local:.2e}, unsynchronised batch norm: {d_bn:.2e}");
    assert!(d_local > 1e-3 && d_bn > 1e-3, "local {d_local:.3e}, unsynced {d_bn:.3e}");
}

/// The pid of the rank `rank` process of a job whose command line names `marker`.
fn pid_of_rank(rank: usize, marker: &str) -> Option<i32> {
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else { continue };
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        if !String::from_utf8_lossy(&cmdline).contains(marker) || !cmdline.starts_with(LOCOGRAPH.as_bytes()) {
            continue;
        }
        let environ = std::fs::read(entry.path().join("environ")).unwrap_or_default();
        if environ.split(|&b| b == 0).any(|kv| kv == format!("OMPI_COMM_WORLD_RANK={rank}").as_bytes()) {
            return Some(pid);
        }
    }
    None
}

/// Rank 1 killed with SIGKILL mid-run: the job ends non-zero within seconds, `mpirun` naming
/// the rank; the newest checkpoint is complete, and `resume` on 2 ranks then gives exactly the
/// weights of an uninterrupted 2-rank run. Resuming on 3 ranks is refused with the reason.
#[test]
fn a_killed_rank_ends_the_job_and_resume_matches_an_uninterrupted_run() {
    let tmp = tempfile::tempdir().expect("tmp");
    let text = experiment("loco", 6, 300, ", checkpoint_every: 20");
    let whole = train(&text, 2, tmp.path(), "whole");

    let file = tmp.path().join("killed.yaml");
    std::fs::write(&file, &text).expect("write");
    let runs = tmp.path().join("killed");
    let child = Command::new("mpirun")
        .args(["--allow-run-as-root", "--oversubscribe", "-np", "2", LOCOGRAPH, "run"])
        .arg(&file)
        .args(["--quiet", "--runs-dir"])
        .arg(&runs)
        .current_dir(tmp.path())
        .env("RAYON_NUM_THREADS", "1")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("mpirun");
    // Wait for a checkpoint past the first, then kill rank 1.
    let deadline = Instant::now() + Duration::from_secs(120);
    let run = loop {
        assert!(Instant::now() < deadline, "no checkpoint appeared");
        let found = std::fs::read_dir(&runs).ok().and_then(|mut d| d.next()).and_then(|e| e.ok()).map(|e| e.path());
        if let Some(run) = found.filter(|r| r.join("checkpoints/step-00000040").exists()) {
            break run;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let marker = file.to_string_lossy().into_owned();
    let pid = pid_of_rank(1, &marker).expect("rank 1's process");
    // SAFETY: kill only sends a signal to a process this test started.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    let killed_at = Instant::now();
    let out = child.wait_with_output().expect("mpirun ends");
    let took = killed_at.elapsed();
    let all = output_text(&out);
    assert!(!out.status.success(), "{all}");
    assert!(all.contains("rank 1") && all.to_lowercase().contains("signal 9"), "{all}");
    assert!(took < Duration::from_secs(10), "the job took {took:?} to end after the kill:\n{all}");
    assert!(!run.join("checkpoints/step-00000300").exists(), "the kill came too late to test anything");

    let refused = locograph(3, tmp.path(), &["resume", run.to_str().expect("utf-8"), "--quiet"]);
    let msg = output_text(&refused);
    assert!(!refused.status.success() && msg.contains("written by a job of 2 rank(s), this one has 3"), "{msg}");

    let resumed = locograph(2, tmp.path(), &["resume", run.to_str().expect("utf-8"), "--quiet"]);
    assert!(resumed.status.success(), "{}", output_text(&resumed));
    let d = weights_diff(&run, &whole);
    assert_eq!(d, 0.0, "resumed after the kill vs uninterrupted: {d:.3e}");
}

/// Training that diverges (a learning rate far too large: a loss or a parameter becomes NaN)
/// ends the job on every rank, non-zero, with the cause and the rank in the message.
#[test]
fn a_diverging_run_ends_the_job_with_the_cause() {
    let tmp = tempfile::tempdir().expect("tmp");
    let text = experiment("simclr", 6, 50, "").replace("lr: 0.005}", "lr: 1.0e30}");
    let file = tmp.path().join("nan.yaml");
    std::fs::write(&file, &text).expect("write");
    let t = Instant::now();
    let out = locograph(2, tmp.path(), &["run", file.to_str().expect("utf-8"), "--quiet", "--runs-dir", "runs"]);
    let all = output_text(&out);
    assert!(!out.status.success(), "{all}");
    assert!(all.contains("of 2: error:") && all.contains("diverged"), "{all}");
    assert!(t.elapsed() < Duration::from_secs(60), "{all}");
}

// ---- stage parallel: `placement:` under mpirun -----------------------------------------------

/// The experiment with its units placed on ranks (`placement:` as YAML text).
fn placed(text: &str, placement: &str) -> String {
    format!("{text}\nplacement: {placement}\n")
}

/// GIM and LoCo stage-parallel under the exact schedule on 2 ranks (automatic placement) and 3
/// ranks (a cut at every unit boundary that LoCo's overlap crosses): after 3 steps the gathered
/// weights equal one process's without a placement, and `ranks.json` has every rank's nodes,
/// busy and idle seconds, bytes and peak memory.
#[test]
fn stage_parallel_exact_equals_one_process() {
    let tmp = tempfile::tempdir().expect("tmp");
    for method in ["gim", "loco"] {
        let text = experiment(method, 6, 3, "");
        let one = train(&text, 0, tmp.path(), &format!("stage-{method}-one"));
        for (ranks, placement) in [
            (2, "{by: compute}".to_string()),
            (3, "{nodes: {stem: 0, res2: 0, res3: 1, res4: 2, res5: 2}}".to_string()),
        ] {
            let many = train(&placed(&text, &placement), ranks, tmp.path(), &format!("stage-{method}-{ranks}"));
            let d = weights_diff(&many, &one);
            eprintln!("stage-parallel {method} on {ranks} ranks: max relative weight difference {d:.2e}");
            assert!(d <= 1e-5, "stage-parallel {method} on {ranks} ranks differs from one process by {d:.3e}");
            let report: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(many.join("ranks.json")).expect("ranks.json"))
                    .expect("json");
            let rows = report.as_array().expect("one row per rank");
            assert_eq!(rows.len(), ranks);
            for (r, row) in rows.iter().enumerate() {
                assert_eq!(row["rank"], r);
                assert!(row["peak_rss_bytes"].as_u64().is_some_and(|b| b > 1 << 20), "{row}");
                assert!(row["busy_s_per_step"].as_f64().is_some_and(|s| s > 0.0), "{row}");
                assert!(row["sent_bytes"].as_u64().unwrap_or(0) + row["received_bytes"].as_u64().unwrap_or(0) > 0);
            }
        }
    }
}

/// The pipelined schedule under mpirun (LoCo, the shared stage res3 on rank 0 and the unit that
/// overlaps it on rank 1): the run finishes, its losses fall, and its weights are not the exact
/// schedule's (res3's upper-loss gradient is applied one step late: tests/stage_parallel.rs
/// pins exactly which).
#[test]
fn stage_parallel_pipelined_runs_under_mpirun() {
    let tmp = tempfile::tempdir().expect("tmp");
    let text = experiment("loco", 6, 3, "");
    let cut = "nodes: {stem: 0, res2: 0, res3: 0, res4: 1, res5: 1}";
    let exact = train(&placed(&text, &format!("{{{cut}}}")), 2, tmp.path(), "exact");
    let piped = train(&placed(&text, &format!("{{{cut}, schedule: pipelined}}")), 2, tmp.path(), "pipelined");
    let d = weights_diff(&piped, &exact);
    assert!(d > 1e-6, "pipelined equals exact ({d:.3e}): no late gradient?");
}

/// A rank count that does not fit a given placement is a usage error naming both counts; a
/// multiple of it (a stage × data grid) is refused as such.
#[test]
fn stage_parallel_refuses_a_wrong_rank_count() {
    let tmp = tempfile::tempdir().expect("tmp");
    let text = placed(&experiment("gim", 6, 1, ""), "{nodes: {stem: 0, res2: 0, res3: 0, res4: 1, res5: 1}}");
    let file = tmp.path().join("placed.yaml");
    std::fs::write(&file, &text).expect("write");
    let f = file.to_str().expect("utf-8");
    let three = locograph(3, tmp.path(), &["run", f, "--quiet", "--runs-dir", "runs"]);
    let all = output_text(&three);
    assert!(!three.status.success() && all.contains("on 2 ranks, but the job has 3"), "{all}");
    let four = locograph(4, tmp.path(), &["run", f, "--quiet", "--runs-dir", "runs"]);
    let all = output_text(&four);
    assert!(!four.status.success() && all.contains("stage × data grid"), "{all}");
}
