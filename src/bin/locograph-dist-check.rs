//! Checks an MPI installation against what locograph's distributed training needs, and shows
//! how a failing rank ends the job. Run under a launcher:
//!
//! ```sh
//! mpirun -np 3 target/release/locograph-dist-check checks --images 7
//! ```
//!
//! `checks` runs `locograph::dist::check` (collectives, NT-Xent with global and local
//! negatives, synchronised batch norm, the gradient reducer, sharded data: each against one
//! process on the whole batch) and prints one line per rank and check. `fail`, `panic` and
//! `kill` make one rank stop while the others are in a collective (an error, or SIGKILL), to see the job end.

use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};
use locograph::dist::{self, check, Communicator};

#[derive(Parser)]
#[command(about = "Checks locograph's distributed layer on this MPI installation")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Every check against one process on the whole batch; exits non-zero if one fails.
    Checks {
        /// Images in the global batch (one the ranks do not divide gives uneven shares).
        #[arg(long, default_value_t = 7)]
        images: usize,
    },
    /// Rank `rank` fails with an error after `after` all-reduces; the others keep reducing.
    Fail {
        #[arg(long)]
        rank: usize,
        #[arg(long, default_value_t = 3)]
        after: usize,
    },
    /// Rank `rank` panics after `after` all-reduces; the others keep reducing.
    Panic {
        #[arg(long)]
        rank: usize,
        #[arg(long, default_value_t = 3)]
        after: usize,
    },
    /// Rank `rank` kills itself (SIGKILL) after `after` all-reduces; the others keep reducing.
    Kill {
        #[arg(long)]
        rank: usize,
        #[arg(long, default_value_t = 3)]
        after: usize,
    },
}

/// All-reduces forever (a stand-in for training steps), with `stop` run on `rank` after `after`.
fn reduce_until(g: &Arc<dyn Communicator>, rank: usize, after: usize, stop: impl Fn()) -> ! {
    let mut step = 0usize;
    loop {
        if g.rank() == rank && step == after {
            stop();
        }
        let mut v = vec![1.0f32; 1 << 16];
        if let Err(e) = g.all_reduce_sum(&mut v) {
            dist::fail(g.as_ref(), &e, 1);
        }
        step += 1;
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn main() {
    let cli = Cli::parse();
    let g = match dist::world() {
        Ok(g) => g,
        Err(e) => {
            eprintln!("locograph-dist-check: {e}");
            std::process::exit(2);
        }
    };
    dist::abort_on_panic(&g);
    match cli.command {
        Command::Checks { images } => {
            match check::all(&g, images) {
                Ok(passed) => {
                    for p in passed {
                        println!(
                            "rank {} of {}: {} ok (max relative error {:.1e})",
                            g.rank(),
                            g.size(),
                            p.check,
                            p.max_rel_err
                        );
                    }
                }
                Err(e) => dist::fail(g.as_ref(), &e, 1),
            }
            // Every rank finishes its checks before any finalises.
            if let Err(e) = g.barrier() {
                dist::fail(g.as_ref(), &e, 1);
            }
        }
        Command::Fail { rank, after } => reduce_until(&g, rank, after, || {
            let cause = locograph::data::DataError::Format {
                path: "train-images-idx3-ubyte".into(),
                offset: 16,
                msg: "truncated (a simulated bad data file)".into(),
            };
            dist::fail(g.as_ref(), &cause, 3)
        }),
        Command::Panic { rank, after } => reduce_until(&g, rank, after, || panic!("a simulated bug")),
        Command::Kill { rank, after } => reduce_until(&g, rank, after, || {
            // SAFETY: raise only sends a signal to this process.
            unsafe {
                libc::raise(libc::SIGKILL);
            }
        }),
    }
}
