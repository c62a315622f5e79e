//! Runs that survive crashes and bad input, through the CLI: SIGKILL at several points and
//! `locograph resume` give weights bit-identical to an uninterrupted run; Ctrl-C saves a
//! checkpoint; a NaN, a truncated or mismatched checkpoint and an oversized config are each
//! refused with a clear message, exit status ≠ 0 and nothing overwritten.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};

/// A tiny LoCo-style graph (two losses, a stop edge) on 8×8 synthetic images, AdamW (per-
/// parameter step counts in its state) and a checkpoint every 3 steps, which does not divide
/// the 8 steps of an epoch: resumes land mid-epoch.
fn experiment(steps: u64, lr: &str) -> String {
    format!(
        r#"version: 1
name: tiny
input: {{channels: 1, size: 8}}
nodes:
  stem: {{op: stem, kind: small, channels: 8}}
  res2: {{op: stage, block: basic, blocks: 1, channels: 8}}
  res3: {{op: stage, block: basic, blocks: 1, channels: 16, stride: 2}}
  dec1: {{op: decoder, mlp: {{depth: 2, hidden: 8, out: 6}}}}
  L1: {{op: nt_xent, temperature: 0.5}}
  dec2: {{op: decoder, mlp: {{depth: 2, hidden: 8, out: 6}}}}
  L2: {{op: nt_xent, temperature: 0.5}}
edges:
  - {{from: input, to: stem}}
  - {{from: stem, to: res2}}
  - {{from: res2, to: res3, stop: [L2]}}
  - {{from: res2, to: dec1}}
  - {{from: dec1, to: L1}}
  - {{from: res3, to: dec2}}
  - {{from: dec2, to: L2}}
data: {{format: synthetic, synthetic: {{train_size: 64, channels: 1, side: 8}}, augment: {{size: 8, jitter: null, blur: null, normalize: null}}}}
optimizer: {{kind: adamw, weight_decay: 0.01}}
schedule: {{kind: constant, lr: {lr}}}
train: {{batch_size: 8, steps: {steps}, log_every: 1, checkpoint_every: 3, threads: 1}}
"#
    )
}

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_locograph"))
}

fn write_experiment(dir: &Path, text: &str) -> PathBuf {
    let file = dir.join("tiny.yaml");
    std::fs::write(&file, text).expect("write experiment");
    file
}

fn spawn_run(file: &Path, runs: &Path) -> Child {
    bin().args(["run", "--quiet", "--runs-dir"]).arg(runs).arg(file).stderr(Stdio::null()).spawn().expect("spawn")
}

fn run_to_end(args: &[&std::ffi::OsStr]) -> Output {
    bin().args(args).output().expect("run")
}

/// The single run directory under `runs`, once it exists.
fn run_dir(runs: &Path) -> Option<PathBuf> {
    std::fs::read_dir(runs).ok()?.next()?.ok().map(|e| e.path())
}

/// The newest complete checkpoint's step.
fn latest_step(run: &Path) -> Option<u64> {
    std::fs::read_dir(run.join("checkpoints"))
        .ok()?
        .filter_map(|e| e.ok()?.file_name().to_str()?.strip_prefix("step-")?.parse().ok())
        .max()
}

/// Waits until `child` has written a checkpoint at `step` or later, then SIGKILLs it.
/// Panics if it finished first (the kill would then test nothing).
fn kill_after_checkpoint(mut child: Child, runs: &Path, step: u64) {
    let t0 = Instant::now();
    loop {
        if run_dir(runs).and_then(|r| latest_step(&r)).is_some_and(|s| s >= step) {
            break;
        }
        let ended = child.try_wait().expect("wait").is_some();
        if ended || t0.elapsed() > Duration::from_secs(60) {
            // Never leave a run behind in a deleted temporary folder.
            let _ = child.kill();
            let _ = child.wait();
            panic!("no checkpoint {step}: the run {}", if ended { "ended first" } else { "took over 60 s" });
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    assert!(child.try_wait().expect("wait").is_none(), "the run ended before it could be killed");
    child.kill().expect("SIGKILL"); // std's kill is SIGKILL on Unix
    child.wait().expect("reap");
}

fn tensors(path: &Path) -> BTreeMap<String, Vec<u64>> {
    let m = candle_core::safetensors::load(path, &Device::Cpu).expect("load safetensors");
    m.into_iter()
        .map(|(k, t): (String, Tensor)| {
            // Compare bit patterns: exact, and NaN-safe (f32 → f64 is exact; AdamW's step
            // counts are f64).
            let v = t.flatten_all().and_then(|t| t.to_dtype(candle_core::DType::F64)?.to_vec1::<f64>()).expect("f64");
            (k, v.iter().map(|x| x.to_bits()).collect())
        })
        .collect()
}

/// Every file under `dir` with its bytes, to check that nothing was written.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).expect("read dir") {
            let p = e.expect("entry").path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.insert(p.clone(), std::fs::read(&p).expect("read"));
            }
        }
    }
    out
}

/// `metrics.csv` without the timing columns (which differ between runs).
fn metric_rows(run: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(run.join("metrics.csv")).expect("metrics");
    text.lines().map(|l| l.split(',').take(5).collect::<Vec<_>>().join(",")).collect()
}

#[test]
fn sigkill_then_resume_is_bit_identical_to_an_uninterrupted_run() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let file = write_experiment(tmp.path(), &experiment(40, "0.01"));

    let straight = tmp.path().join("straight");
    let out = run_to_end(&[
        "run".as_ref(),
        "--quiet".as_ref(),
        "--runs-dir".as_ref(),
        straight.as_os_str(),
        file.as_os_str(),
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let straight = run_dir(&straight).expect("run");

    // Killed three times: mid-epoch 1, mid-epoch 2 (during a resume) and mid-epoch 4.
    let crashed = tmp.path().join("crashed");
    kill_after_checkpoint(spawn_run(&file, &crashed), &crashed, 6);
    let run = run_dir(&crashed).expect("run");
    let resume = || bin().args(["resume", "--quiet"]).arg(&run).stderr(Stdio::null()).spawn().expect("spawn");
    kill_after_checkpoint(resume(), &crashed, 15);
    kill_after_checkpoint(resume(), &crashed, 30);
    let out = run_to_end(&["resume".as_ref(), "--quiet".as_ref(), run.as_os_str()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("resuming") && stderr.contains("from step"), "{stderr}");

    let (a, b) = (tensors(&straight.join("weights.safetensors")), tensors(&run.join("weights.safetensors")));
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    for (k, v) in &a {
        assert!(v == &b[k], "`{k}` differs after resuming");
    }
    let opt = |r: &Path| tensors(&r.join("checkpoints/step-00000040/optimizer.safetensors"));
    assert_eq!(opt(&straight), opt(&run), "optimizer state differs after resuming");
    // No duplicated or missing rows, and the logged losses are the same.
    let rows = metric_rows(&run);
    assert_eq!(rows.len(), 41, "{rows:#?}");
    assert_eq!(rows, metric_rows(&straight));

    // Resuming a finished run does nothing and says so.
    let before = snapshot(&run);
    let out = run_to_end(&["resume".as_ref(), "--quiet".as_ref(), run.as_os_str()]);
    assert_eq!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stderr).contains("already complete at step 40"));
    assert!(before == snapshot(&run), "resuming a finished run wrote something");
}

#[test]
fn ctrl_c_saves_a_checkpoint_and_exits_cleanly() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let file = write_experiment(tmp.path(), &experiment(100_000, "0.01"));
    let runs = tmp.path().join("runs");
    let mut child = bin()
        .args(["run", "--quiet", "--runs-dir"])
        .arg(&runs)
        .arg(&file)
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let t0 = Instant::now();
    // After the first checkpoint, so the handler is surely installed.
    while run_dir(&runs).and_then(|r| latest_step(&r)).is_none_or(|s| s < 3) {
        if t0.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("no checkpoint after 60 s");
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let status = Command::new("kill").args(["-INT", &child.id().to_string()]).status().expect("kill -INT");
    assert!(status.success());
    let out = child.wait_with_output().expect("wait");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{stderr}");
    let run = run_dir(&runs).expect("run");
    let step = latest_step(&run).expect("a checkpoint");
    assert!(stderr.contains(&format!("interrupted: checkpoint at step {step} of 100000")), "{stderr}");
    assert!(stderr.contains("locograph resume"), "{stderr}");
    let rows = metric_rows(&run);
    assert_eq!(rows.last().and_then(|r| r.split(',').next()), Some(step.to_string().as_str()), "{rows:?}");
    // It resumes from there (here only to a slightly later step, for time).
    let out = run_to_end(&[
        "resume".as_ref(),
        "--quiet".as_ref(),
        "--steps".as_ref(),
        (step + 2).to_string().as_ref(),
        run.as_os_str(),
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(latest_step(&run), Some(step + 2));
}

#[test]
fn a_diverging_run_stops_and_keeps_its_last_good_checkpoint() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let file =
        write_experiment(tmp.path(), &experiment(40, "1.0e30").replace("checkpoint_every: 3", "checkpoint_every: 1"));
    let runs = tmp.path().join("runs");
    let out =
        run_to_end(&["run".as_ref(), "--quiet".as_ref(), "--runs-dir".as_ref(), runs.as_os_str(), file.as_os_str()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(4), "diverged: {stderr}");
    // Either the loss turned NaN/inf or an update overflowed a parameter: both name the step.
    assert!((stderr.contains("loss `L") || stderr.contains("parameter `")) && stderr.contains("step"), "{stderr}");
    let run = run_dir(&runs).expect("run");
    if let Some(step) = latest_step(&run) {
        let ckpt = run.join(format!("checkpoints/step-{step:08}"));
        for (k, v) in tensors(&ckpt.join("weights.safetensors")) {
            assert!(v.iter().all(|b| f64::from_bits(*b).is_finite()), "checkpoint {step} has a non-finite `{k}`");
        }
        // Resuming diverges the same way and overwrites nothing.
        let before = snapshot(&run.join("checkpoints"));
        let out = run_to_end(&["resume".as_ref(), "--quiet".as_ref(), run.as_os_str()]);
        assert_eq!(out.status.code(), Some(4), "{}", String::from_utf8_lossy(&out.stderr));
        assert!(before == snapshot(&run.join("checkpoints")), "a diverging resume changed the checkpoints");
    }
}

/// A finished 6-step run (checkpoints at 3 and 6) to damage.
fn finished_run(tmp: &Path) -> PathBuf {
    let file = write_experiment(tmp, &experiment(6, "0.01"));
    let runs = tmp.join("runs");
    let out =
        run_to_end(&["run".as_ref(), "--quiet".as_ref(), "--runs-dir".as_ref(), runs.as_os_str(), file.as_os_str()]);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    run_dir(&runs).expect("run")
}

/// `resume` refused with exit status `code` (README: 2 for a checkpoint of another graph, 1 for
/// a damaged one), writing nothing.
fn resume_refused(run: &Path, code: i32) -> String {
    let before = snapshot(run);
    let out = run_to_end(&["resume".as_ref(), "--quiet".as_ref(), "--steps".as_ref(), "9".as_ref(), run.as_os_str()]);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(code), "{stderr}");
    assert!(before == snapshot(run), "a refused resume wrote something: {stderr}");
    stderr
}

#[test]
fn a_truncated_checkpoint_is_refused() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let run = finished_run(tmp.path());
    let w = run.join("checkpoints/step-00000006/weights.safetensors");
    let bytes = std::fs::read(&w).expect("read");
    std::fs::write(&w, &bytes[..bytes.len() / 2]).expect("truncate");
    let err = resume_refused(&run, 1);
    assert!(err.contains("step-00000006 is damaged") && err.contains("weights.safetensors"), "{err}");
    assert!(err.contains("does not match its recorded sha256") && err.contains("previous checkpoint"), "{err}");
    // A torn state.json is named too.
    std::fs::write(&w, &bytes).expect("restore");
    let s = run.join("checkpoints/step-00000006/state.json");
    let text = std::fs::read_to_string(&s).expect("state");
    std::fs::write(&s, &text[..text.len() / 2]).expect("truncate");
    let err = resume_refused(&run, 1);
    assert!(err.contains("is damaged: state.json"), "{err}");
}

#[test]
fn a_checkpoint_of_another_graph_is_refused_listing_the_keys() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let run = finished_run(tmp.path());
    let cfg = run.join("config.yaml");
    let text = std::fs::read_to_string(&cfg).expect("config");
    std::fs::write(&cfg, text.replace("channels: 16", "channels: 24")).expect("write");
    let err = resume_refused(&run, 2);
    assert!(err.contains("was written for graph") && err.contains("nodes or edges changed"), "{err}");
    assert!(err.contains("do not match the graph") && err.contains("res3."), "{err}");
    // Same names and shapes but different routing: refused on the hash alone.
    std::fs::write(&cfg, text.replace("  stop:\n  - L2", "  stop: all")).expect("write");
    assert_ne!(std::fs::read_to_string(&cfg).expect("config"), text, "the edit did not apply");
    let err = resume_refused(&run, 2);
    assert!(err.contains("was written for graph") && err.contains("routing would differ"), "{err}");
}

/// `validate` answers whether the experiment is right, and reports the predicted memory of a
/// step as information; `run` refuses a step that does not fit this machine, before allocating
/// anything.
#[test]
fn an_oversized_config_validates_but_does_not_run() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let text = experiment(6, "0.01").replace("batch_size: 8", "batch_size: 1000000000000");
    let file = write_experiment(tmp.path(), &text);
    let out = bin().arg("validate").arg(&file).output().expect("validate");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        stdout.contains("needs about") && stdout.contains("does not fit") && stdout.contains("MemTotal"),
        "{stdout}"
    );
    let runs = tmp.path().join("runs");
    let args: Vec<&std::ffi::OsStr> =
        vec!["run".as_ref(), "--quiet".as_ref(), "--runs-dir".as_ref(), runs.as_os_str(), file.as_os_str()];
    let out = run_to_end(&args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("train.batch_size") && stderr.contains("would need about"), "{stderr}");
    assert!(stderr.contains("more than the limit of") && stderr.contains("MemTotal"), "{stderr}");
    assert!(!runs.exists(), "run created a run directory");
    // The limit can be lowered: this 5 000-parameter model needs more than 64 KiB at batch 8.
    let file = write_experiment(tmp.path(), &experiment(6, "0.01"));
    let out = bin().arg("validate").arg(&file).env("LOCOGRAPH_MEMORY_LIMIT", "64K").output().expect("validate");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("does not fit") && stdout.contains("64.0 KiB (LOCOGRAPH_MEMORY_LIMIT)"), "{stdout}");
    let out = bin()
        .args(["run".as_ref(), "--quiet".as_ref(), "--runs-dir".as_ref(), runs.as_os_str(), file.as_os_str()])
        .env("LOCOGRAPH_MEMORY_LIMIT", "64K")
        .output()
        .expect("run");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("64.0 KiB (LOCOGRAPH_MEMORY_LIMIT)"), "{stderr}");
    let out = bin().arg("validate").arg(&file).output().expect("validate");
    assert!(String::from_utf8_lossy(&out.stdout).contains(" fits in this machine"));
}

#[test]
fn the_graph_hash_ignores_order_but_not_content() {
    use locograph::exec::checkpoint::graph_hash;
    let hash = |text: &str| {
        let loaded = locograph::config::parse_str(text, Path::new("tests/inline.yaml")).expect("parse");
        graph_hash(&loaded.experiment)
    };
    let text = experiment(6, "0.01");
    let base = hash(&text);
    // Nodes and edges listed in another order: the same graph.
    let swapped = text
        .replace("  dec1: {op: decoder, mlp: {depth: 2, hidden: 8, out: 6}}\n  L1: {op: nt_xent, temperature: 0.5}\n", "")
        .replace("  L2: {op: nt_xent, temperature: 0.5}\n", "  L2: {op: nt_xent, temperature: 0.5}\n  L1: {op: nt_xent, temperature: 0.5}\n  dec1: {op: decoder, mlp: {depth: 2, hidden: 8, out: 6}}\n")
        .replace("  - {from: res2, to: dec1}\n  - {from: dec1, to: L1}\n", "")
        .replace("  - {from: dec2, to: L2}\n", "  - {from: dec2, to: L2}\n  - {from: dec1, to: L1}\n  - {from: res2, to: dec1}\n");
    assert_ne!(swapped, text);
    assert_eq!(hash(&swapped), base);
    // Not the graph: the hash stays. A width, a stop or a temperature: it changes.
    assert_eq!(hash(&text.replace("lr: 0.01", "lr: 0.02")), base);
    assert_ne!(hash(&text.replace("hidden: 8, out: 6}}\n  L2", "hidden: 9, out: 6}}\n  L2")), base);
    assert_ne!(hash(&text.replace("stop: [L2]", "stop: all")), base);
    assert_ne!(
        hash(&text.replace("L2: {op: nt_xent, temperature: 0.5}", "L2: {op: nt_xent, temperature: 0.25}")),
        base
    );
    // A missing run directory is named as such.
    let out = bin().args(["resume", "no/such/run"]).output().expect("resume");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a run directory"));
}
