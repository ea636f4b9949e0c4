//! `flare-node`: the one binary every site runs. This file only parses the command line and
//! calls the library.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use flare_node::bench::{SimBench, run_sim_bench};
use flare_node::simulator::{self, SimOptions};
use tracing_subscriber::EnvFilter;

#[derive(Debug, Parser)]
#[command(
    name = "flare-node",
    version,
    about = "Flare: peer-to-peer federated learning"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a whole job in one process: the server's controller and N simulated clients.
    Simulate {
        /// The job folder (meta.json plus app folders).
        job: PathBuf,
        /// Number of simulated clients (site-1 … site-N).
        #[arg(short = 'n', long = "n-clients", default_value_t = 2)]
        clients: usize,
        /// Workspace for models and metrics [default: /tmp/flare/simulator/<job name>].
        #[arg(short, long)]
        workspace: Option<PathBuf>,
        /// Worker threads for client tasks [default: the number of CPUs].
        #[arg(short, long)]
        threads: Option<usize>,
        /// No progress output, only the final table.
        #[arg(short, long)]
        quiet: bool,
        /// Print the report as JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Measure Flare itself.
    #[command(subcommand)]
    Bench(BenchCommand),
}

#[derive(Debug, Subcommand)]
enum BenchCommand {
    /// Simulator seconds per round and peak RSS for a synthetic model (one configuration per
    /// process, so the peak belongs to it).
    Sim {
        /// f32 parameters in the model.
        #[arg(long, default_value_t = 10)]
        params: usize,
        /// Simulated clients.
        #[arg(long, default_value_t = 8)]
        clients: usize,
        /// Rounds.
        #[arg(long, default_value_t = 10)]
        rounds: u32,
        /// Worker threads [default: the number of CPUs].
        #[arg(long)]
        threads: Option<usize>,
    },
    /// Centralized training of the built-in MLP on all of MNIST's training part (the
    /// accuracy federated runs are compared with).
    Centralized {
        /// Folder with the MNIST IDX files.
        #[arg(long, default_value = "data/mnist")]
        data_dir: PathBuf,
        /// Epochs.
        #[arg(long, default_value_t = 5)]
        epochs: usize,
    },
    /// Time one training step of the LibTorch CNN (compare with `bench/torch_step.py`).
    #[cfg(feature = "torch")]
    TorchStep {
        /// auto, cpu, cuda or cuda:N.
        #[arg(long, default_value = "auto")]
        device: String,
        /// Batch sizes, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "64,256")]
        batch_sizes: Vec<usize>,
        /// Timed steps per batch size.
        #[arg(long, default_value_t = 300)]
        steps: usize,
        /// Untimed warm-up steps.
        #[arg(long, default_value_t = 50)]
        warmup: usize,
        /// sgd, adam or adadelta.
        #[arg(long, default_value = "adam")]
        optimizer: String,
        /// Learning rate.
        #[arg(long, default_value_t = 1e-3)]
        lr: f64,
    },
}

fn cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Simulate {
            job,
            clients,
            workspace,
            threads,
            quiet,
            json,
        } => {
            let name = job
                .canonicalize()
                .with_context(|| format!("job folder {}", job.display()))?
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| "job".into());
            let workspace =
                workspace.unwrap_or_else(|| PathBuf::from("/tmp/flare/simulator").join(name));
            let report = simulator::run(&SimOptions {
                job_dir: job,
                clients,
                workspace,
                threads: threads.unwrap_or_else(cpus),
                progress: !quiet,
            })?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                println!("{}", simulator::format_table(&report));
                println!("final model:   {}", report.final_model.display());
                println!("metrics:       {}", report.metrics_file.display());
                if let Some(dir) = report.round_models.first().and_then(|p| p.parent()) {
                    println!("round models:  {}", dir.display());
                }
                println!("total time:    {:.1} s", report.seconds);
            }
        }
        Command::Bench(BenchCommand::Sim {
            params,
            clients,
            rounds,
            threads,
        }) => {
            let r = run_sim_bench(&SimBench {
                params,
                clients,
                rounds,
                threads: threads.unwrap_or_else(cpus),
            })?;
            println!("{}", serde_json::to_string(&r)?);
        }
        Command::Bench(BenchCommand::Centralized { data_dir, epochs }) => {
            let r = flare_node::bench::run_centralized(&data_dir, epochs)?;
            println!("{}", serde_json::to_string(&r)?);
        }
        #[cfg(feature = "torch")]
        Command::Bench(BenchCommand::TorchStep {
            device,
            batch_sizes,
            steps,
            warmup,
            optimizer,
            lr,
        }) => {
            let rows = flare_node::bench::run_torch_step(&flare_node::bench::TorchStepBench {
                device: device.parse().map_err(anyhow::Error::msg)?,
                batch_sizes,
                steps,
                warmup,
                optimizer: optimizer.parse().map_err(anyhow::Error::msg)?,
                lr,
            })?;
            for r in rows {
                println!("{}", serde_json::to_string(&r)?);
            }
        }
    }
    Ok(())
}
