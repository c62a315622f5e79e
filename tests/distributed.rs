//! The distributed layer under real MPI: `mpirun -np 2` and `-np 3` on `locograph-dist-check`
//! (built with `--features mpi`; this test exists only in that build). Needs OpenMPI's
//! `mpirun` on the PATH (`.ci/run` installs it): without it these tests fail, they do not skip.

use std::process::{Command, Output};
use std::time::{Duration, Instant};

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

fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// Every check (collectives; NT-Xent global and local against one process, f64 ≤ 1e-10; sync
/// batch norm; the reducer's exact mean; sharded data) passes on every rank, with shares that
/// are even (6 images on 2 and 3 ranks) and uneven (7).
#[test]
fn every_check_passes_on_two_and_three_ranks() {
    for (ranks, images) in [(2, 6), (2, 7), (3, 6), (3, 7)] {
        let (out, _) = mpirun(ranks, &["checks", "--images", &images.to_string()]);
        let all = text(&out);
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
    let all = text(&out);
    assert!(!out.status.success(), "{all}");
    assert!(all.contains("rank 1 of 3: train-images-idx3-ubyte: at byte 16: truncated"), "{all}");
    assert!(took < Duration::from_secs(30), "took {took:?}:\n{all}");
}

/// A panic on one rank ends the job too (unwinding would finalise MPI and wait forever).
#[test]
fn a_panicking_rank_ends_the_job() {
    let (out, took) = mpirun(2, &["panic", "--rank", "0", "--after", "2"]);
    let all = text(&out);
    assert!(!out.status.success(), "{all}");
    assert!(all.contains("a simulated bug") && all.contains("rank 0 of 2: panicked"), "{all}");
    assert!(took < Duration::from_secs(30), "took {took:?}:\n{all}");
}

/// A rank killed with SIGKILL mid-run: `mpirun` ends the job, non-zero, naming the rank, within
/// seconds; nobody hangs in the collective the dead rank never joins.
#[test]
fn a_killed_rank_ends_the_job() {
    let (out, took) = mpirun(2, &["kill", "--rank", "1", "--after", "3"]);
    let all = text(&out);
    assert!(!out.status.success(), "{all}");
    assert!(all.contains("rank 1") && all.to_lowercase().contains("signal 9"), "{all}");
    assert!(took < Duration::from_secs(30), "took {took:?}:\n{all}");
}
