//! How much of the gradient all-reduce the backward hides, with OpenMPI on this machine.
//!
//! `mpirun -np 2 target/release/deps/reducer_overlap-* [--mb 45] [--bucket-mb 25] [--chunks 40]
//!  [--rounds 3]`, or `cargo bench --features mpi --bench reducer_overlap` for one rank.
//!
//! A stand-in backward: `chunks` slices of compute (candle matmuls, on rayon's pool) each
//! followed by the push of `mb / chunks` MiB of gradients, as the engine pushes each node's
//! gradients when they are final. Three timings per round, in one run, alternating:
//! - `compute`: the slices alone;
//! - `reduce`: the pushes alone, then `finish` (all communication, nothing to hide it behind);
//! - `both`: slices and pushes interleaved, then `finish`.
//!
//! `hidden = (compute + reduce − both) / reduce`: 1 when the reduction is free, 0 when it adds
//! its whole time. Also the reducer's own account (`waiting` in `finish` vs `communicating` on
//! its thread). One `key=value` line per round from rank 0, then the medians.

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use locograph::dist::{self, reducer::GradReducer};

struct Args {
    mb: f64,
    bucket_mb: f64,
    chunks: usize,
    rounds: usize,
}

fn args() -> Args {
    let mut a = Args { mb: 45.0, bucket_mb: 25.0, chunks: 40, rounds: 3 };
    let v: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < v.len() {
        let next = v.get(i + 1).and_then(|s| s.parse::<f64>().ok());
        match (v[i].as_str(), next) {
            ("--mb", Some(x)) => a.mb = x,
            ("--bucket-mb", Some(x)) => a.bucket_mb = x,
            ("--chunks", Some(x)) => a.chunks = x as usize,
            ("--rounds", Some(x)) => a.rounds = x as usize,
            // cargo bench passes --bench
            _ => {
                i += 1;
                continue;
            }
        }
        i += 2;
    }
    a
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> candle_core::Result<()> {
    let a = args();
    let g = dist::world().map_err(candle_core::Error::wrap)?;
    let dev = Device::Cpu;
    let m = Tensor::randn(0f32, 1.0, (384, 384), &dev)?;
    let per_chunk = ((a.mb * 1048576.0 / 4.0) as usize / a.chunks).max(1);
    let grads: Vec<Tensor> =
        (0..a.chunks).map(|_| Tensor::ones(per_chunk, DType::F32, &dev)).collect::<candle_core::Result<_>>()?;
    let compute = |_: usize| -> candle_core::Result<()> {
        let mut x = m.clone();
        for _ in 0..3 {
            x = (x.matmul(&m)? * 1e-3)?;
        }
        x.sum_all()?.to_scalar::<f32>().map(|_| ())
    };
    let bucket = (a.bucket_mb * 1048576.0) as usize;
    let wrap = candle_core::Error::wrap;
    let (mut tc, mut tr, mut tb, mut hidden) = (vec![], vec![], vec![], vec![]);
    for round in 0..a.rounds {
        g.barrier().map_err(wrap)?;
        let t = Instant::now();
        for k in 0..a.chunks {
            compute(k)?;
        }
        let c = t.elapsed().as_secs_f64();

        let mut red = GradReducer::new(&g, bucket).map_err(wrap)?;
        g.barrier().map_err(wrap)?;
        let t = Instant::now();
        for (k, gr) in grads.iter().enumerate() {
            red.push(k, vec![(k, gr.clone())]).map_err(wrap)?;
        }
        red.finish().map_err(wrap)?;
        let r = t.elapsed().as_secs_f64();

        let mut red = GradReducer::new(&g, bucket).map_err(wrap)?;
        g.barrier().map_err(wrap)?;
        let t = Instant::now();
        for (k, gr) in grads.iter().enumerate() {
            compute(k)?;
            red.push(k, vec![(k, gr.clone())]).map_err(wrap)?;
            red.ready().map_err(wrap)?;
        }
        red.finish().map_err(wrap)?;
        let b = t.elapsed().as_secs_f64();
        let s = red.stats();
        let h = ((c + r - b) / r).clamp(0.0, 1.0);
        if g.rank() == 0 {
            println!(
                "round={round} ranks={} threads={} mb={:.1} bucket_mb={} buckets={} compute_s={c:.3} reduce_s={r:.3} both_s={b:.3} hidden={h:.2} reducer_communicating_s={:.3} reducer_waiting_s={:.3}",
                g.size(),
                rayon::current_num_threads(),
                s.bytes as f64 / 1048576.0,
                a.bucket_mb,
                s.buckets,
                s.communicating_s,
                s.waiting_s
            );
        }
        tc.push(c);
        tr.push(r);
        tb.push(b);
        hidden.push(h);
    }
    if g.rank() == 0 {
        println!(
            "median compute_s={:.3} reduce_s={:.3} both_s={:.3} hidden={:.2}",
            median(tc),
            median(tr),
            median(tb),
            median(hidden)
        );
    }
    Ok(())
}
