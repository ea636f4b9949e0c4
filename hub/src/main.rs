//! `flare-node`: the one binary every site runs. This file only parses the command line and
//! calls the library.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use flare_node::bench::{SimBench, run_sim_bench};
use flare_node::cmd_provision;
use flare_node::roles::admin::AdminCommand;
use flare_node::simulator::{self, SimOptions};
use tracing_subscriber::EnvFilter;

#[derive(Debug, Parser)]
#[command(
    name = "flare-node",
    version,
    about = "Flare: peer-to-peer federated learning"
)]
struct Cli {
    /// Run the node of this startup kit (server or client), e.g. `--kit site-1/startup`.
    #[arg(long, value_name = "STARTUP_DIR")]
    kit: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a whole job in one process: the server's controller and N simulated clients.
    #[command(alias = "simulator")]
    Simulate {
        /// The job folder (meta.json plus app folders).
        job: PathBuf,
        /// Number of simulated clients (site-1 … site-N); with --regions, sites per region.
        #[arg(short = 'n', long = "n-clients", default_value_t = 2)]
        clients: usize,
        /// Simulate a tiered federation of this many regions (region-1 … region-R, each with
        /// N sites), for a TieredScatterAndGather job.
        #[arg(long)]
        regions: Option<usize>,
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
    /// Admin console: talk to the server with an admin kit. `--kit` and `--json` go before
    /// or after the command (`admin --kit K status`, `admin status --kit K`).
    Admin {
        // An `Option` because clap's global options (those that may follow the command)
        // cannot be required; `main` says it is missing. Its own id because clap copies a
        // global's value to every level, and the node's top-level `--kit` is `kit`.
        /// The admin's startup kit folder (required).
        #[arg(
            id = "admin_kit",
            long = "kit",
            value_name = "STARTUP_DIR",
            global = true
        )]
        kit: Option<PathBuf>,
        /// Print JSON instead of tables.
        #[arg(long, global = true)]
        json: bool,
        #[command(subcommand)]
        command: AdminCommand,
    },
    /// The web dashboard: the federation, its jobs and their metrics in a browser, with
    /// the admin kit's rights. Prints the URL to open (it carries the session token).
    Dashboard {
        /// The admin's startup kit folder.
        #[arg(long, value_name = "STARTUP_DIR")]
        kit: PathBuf,
        /// Where to listen (port 0: any free port).
        #[arg(long, default_value_t = flare_node::dashboard::DEFAULT_LISTEN)]
        listen: std::net::SocketAddr,
        /// Allow a non-loopback --listen address (needs --token-file).
        #[arg(long)]
        allow_remote: bool,
        /// A file holding the session token (at least 32 letters, digits, '-', '_', '.' or
        /// '~') instead of a random one.
        #[arg(long, value_name = "FILE")]
        token_file: Option<PathBuf>,
    },
    /// Job templates: list them, make a job folder from one, show its variables, submit it.
    Job {
        #[command(subcommand)]
        cmd: flare_node::job_cli::JobCommand,
    },
    /// Make signed startup kits from a project.yml.
    Provision(cmd_provision::ProvisionArgs),
    /// A local proof-of-concept project.
    Poc {
        #[command(subcommand)]
        command: cmd_provision::PocCommand,
    },
    /// The audit log (`<workspace>/audit.log`): check its hash chain, or print it.
    #[command(subcommand)]
    Audit(AuditCommand),
}

#[derive(Debug, Subcommand)]
enum AuditCommand {
    /// Check the hash chain: exit 0 if intact, 1 naming the first broken line, 2 if the
    /// file cannot be read.
    Verify {
        /// The audit file.
        file: PathBuf,
    },
    /// Print the lines as a table (does not check the chain; `verify` does).
    Show {
        /// The audit file.
        file: PathBuf,
        /// Only the lines of this job.
        #[arg(long)]
        job: Option<String>,
        /// Only the lines of this kind: admin_command, job_event, policy or workflow.
        #[arg(long)]
        kind: Option<flare_node::audit::AuditKind>,
    },
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
    /// A sealed transfer between two node processes, direct or through the relay: MiB/s and
    /// each process's peak RSS.
    Transfer {
        /// Payload size in MiB.
        #[arg(long, default_value_t = 1024)]
        mib: u64,
        /// Go through the server's circuit relay (hole punching off).
        #[arg(long)]
        relayed: bool,
        /// Unsealed 1 MiB writes on the same streams: the libp2p ceiling to compare with.
        #[arg(long)]
        plain: bool,
    },
    /// One FedAvg job of a synthetic model on a server and client processes: seconds per
    /// round and each process's peak RSS.
    Fedavg {
        /// f32 parameters.
        #[arg(long, default_value_t = 100_000_000)]
        params: usize,
        /// Client processes.
        #[arg(long, default_value_t = 4)]
        clients: usize,
        /// Rounds.
        #[arg(long, default_value_t = 1)]
        rounds: u32,
        /// Print progress on stderr every this many rounds (0: never).
        #[arg(long, default_value_t = 100)]
        progress_every: u32,
        /// Quantize the model both ways (the four ModelQuantizer/ModelDequantizer filters):
        /// float16, bfloat16 or blockwise8.
        #[arg(long)]
        quantize: Option<String>,
        /// Run swarm (every site trains and may aggregate) instead of scatter-and-gather.
        #[arg(long)]
        swarm: bool,
        /// Secure aggregation (SecAgg+), with settings fit for the synthetic model.
        #[arg(long)]
        secagg: bool,
    },
    /// What secure aggregation costs across real processes: for each model size and
    /// workflow, a POC federation runs the synthetic FedAvg job without and with SecAgg+,
    /// alternating; seconds per round and TCP bytes a site sends; writes processes.md and
    /// processes.json (~10 min with the defaults on 2 cores).
    Secagg {
        /// Model sizes (f32 parameters), comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "1000000,10000000")]
        params: Vec<usize>,
        /// Site processes.
        #[arg(long, default_value_t = 8)]
        clients: usize,
        /// Rounds of each job (the first is left out of the round times).
        #[arg(long, default_value_t = 6)]
        rounds: u32,
        /// Pairs of jobs (plain, SecAgg+) per setting; the order alternates (off, on, on,
        /// off, …).
        #[arg(long, default_value_t = 2)]
        repeats: u32,
        /// Workflows, comma-separated: scatter-and-gather (or sag), swarm.
        #[arg(
            long,
            value_delimiter = ',',
            default_value = "scatter-and-gather,swarm"
        )]
        workflows: Vec<String>,
        /// Where processes.md and processes.json go.
        #[arg(long, default_value = "bench/results/secagg")]
        out: PathBuf,
    },
    /// The Client API's cost: the same training in process and in `flare-test-trainer`
    /// (median task time, hand-off seconds each way, the node's peak RSS per model size).
    ClientApi {
        /// f32 parameters in the model.
        #[arg(long, default_value_t = 1000)]
        params: usize,
        /// Elements per tensor.
        #[arg(long, default_value_t = 1 << 24)]
        tensor_size: usize,
        /// Timed tasks in each phase.
        #[arg(long, default_value_t = 20)]
        tasks: usize,
        /// The trainer [default: flare-test-trainer beside this binary].
        #[arg(long)]
        trainer: Option<PathBuf>,
        /// Where the exchange files go [default: a temporary folder].
        #[arg(long)]
        work_dir: Option<PathBuf>,
    },
    /// One end of `bench transfer` (started by it).
    #[command(hide = true)]
    TransferPeer {
        /// The kit to run as.
        #[arg(long)]
        kit: PathBuf,
        /// Receive instead of send.
        #[arg(long)]
        receive: bool,
        /// Payload size in MiB.
        #[arg(long)]
        mib: u64,
        /// The receiver's PeerId.
        #[arg(long)]
        to: Option<String>,
        /// The receiver's direct address (repeatable; tried first).
        #[arg(long)]
        addr: Vec<String>,
        /// The receiver's relay circuit address (the fallback).
        #[arg(long)]
        circuit: Option<String>,
        /// Listen here (DCUtR needs listeners on both ends).
        #[arg(long)]
        listen: Option<String>,
        /// Receiver: also reserve a circuit on the kit's server (the relay).
        #[arg(long)]
        relay: bool,
        /// Relay only: no direct addresses, no hole punching.
        #[arg(long)]
        relayed: bool,
        /// Unsealed payload.
        #[arg(long)]
        plain: bool,
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
    /// A learning-quality study of the aggregation algorithms on MNIST: FedAvg across
    /// Dirichlet label skews and FedProx, FedOpt, FedAdam and Scaffold at the strongest, with a
    /// centralized reference; writes table.md, results.json and accuracy.svg (~5 min).
    Algorithms {
        /// Rounds per run [default: 50; 10 with --quick].
        #[arg(long)]
        rounds: Option<u32>,
        /// Local epochs per round.
        #[arg(long, default_value_t = 4)]
        epochs: usize,
        /// Seeds per configuration [default: 3; 1 with --quick].
        #[arg(long)]
        seeds: Option<u64>,
        /// Simulated sites.
        #[arg(long, default_value_t = 8)]
        sites: usize,
        /// Where table.md, results.json and accuracy.svg go.
        #[arg(long, default_value = "bench/results/algorithms")]
        out: PathBuf,
        /// A smoke run: 10 rounds, one seed (explicit --rounds and --seeds still win).
        #[arg(long)]
        quick: bool,
        /// Accuracy whose first crossing is counted in rounds [default: 0.93 for the MLP,
        /// 0.97 for the CNN].
        #[arg(long)]
        target: Option<f64>,
        /// The sites' learner: mlp (built in) or cnn (needs a `--features torch` build).
        #[arg(long, default_value = "mlp")]
        learner: String,
        /// Only the configurations of these aggregators, comma-separated (e.g. FedAvg,Scaffold).
        #[arg(long, value_delimiter = ',')]
        algorithms: Vec<String>,
        /// Folder with the MNIST IDX files.
        #[arg(long, default_value = "data/mnist")]
        data_dir: PathBuf,
        /// Worker threads [default: the number of CPUs].
        #[arg(long)]
        threads: Option<usize>,
    },
    /// What central differential privacy costs: DP-FedAvg on MNIST at ε ≈ 8 and ε ≈ 1
    /// (δ = 1e-5) against the same run without DP; writes table.md, results.json and
    /// accuracy.svg (3–6 min).
    Dp {
        /// Rounds per run [default: 20; 10 with --quick].
        #[arg(long)]
        rounds: Option<u32>,
        /// Seeds per setting [default: 3; 1 with --quick].
        #[arg(long)]
        seeds: Option<u64>,
        /// Simulated sites, all in every round (central DP needs many: the noise is
        /// z·√d/m times the mean update).
        #[arg(long, default_value_t = 400)]
        sites: usize,
        /// The budgets, comma-separated (one DP setting each).
        #[arg(long, value_delimiter = ',', default_value = "8,1")]
        epsilons: Vec<f64>,
        /// The fixed clipping norm C.
        #[arg(long, default_value_t = 0.5)]
        clip: f64,
        /// Skip the adaptive-clipping rows.
        #[arg(long)]
        no_adaptive: bool,
        /// Where table.md, results.json and accuracy.svg go.
        #[arg(long, default_value = "bench/results/dp")]
        out: PathBuf,
        /// A smoke run: 10 rounds, one seed (explicit --rounds and --seeds still win).
        #[arg(long)]
        quick: bool,
        /// Folder with the MNIST IDX files.
        #[arg(long, default_value = "data/mnist")]
        data_dir: PathBuf,
        /// Worker threads [default: the number of CPUs].
        #[arg(long)]
        threads: Option<usize>,
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
    let cli = Cli::parse();
    // A node logs its progress by default; commands only warn.
    let default = if cli.kit.is_some() { "info" } else { "warn" };
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default)),
        )
        .with_writer(std::io::stderr)
        // Colours only on a terminal: a node's log file stays plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match (&cli.kit, &cli.command) {
        (Some(kit), None) => {
            let dir = kit.clone();
            let hub: flare_node::roles::ExternalRole = Box::new(move |shutdown| {
                Box::pin(async move { flare_hub::role::run(&dir, shutdown).await })
            });
            return exit(flare_node::roles::run_node_with(kit, Some(hub)));
        }
        (Some(_), Some(_)) => {
            eprintln!(
                "error: --kit runs a node; give it alone (admin commands take `admin --kit`)"
            );
            return ExitCode::from(2);
        }
        (None, Some(Command::Admin { kit, json, command })) => {
            let Some(kit) = kit else {
                eprintln!("error: admin: --kit <admin startup kit folder> is required");
                return ExitCode::from(2);
            };
            let code = match tokio::runtime::Runtime::new() {
                Ok(rt) => rt.block_on(flare_node::roles::admin::run(kit, command.clone(), *json)),
                Err(e) => {
                    eprintln!("error: cannot start the runtime: {e}");
                    1
                }
            };
            return ExitCode::from(code as u8);
        }
        (None, Some(Command::Audit(command))) => return audit(command),
        (
            None,
            Some(Command::Dashboard {
                kit,
                listen,
                allow_remote,
                token_file,
            }),
        ) => {
            let opts = flare_node::dashboard::DashboardOptions {
                kit_dir: kit.clone(),
                listen: *listen,
                allow_remote: *allow_remote,
                token_file: token_file.clone(),
            };
            return exit(
                tokio::runtime::Runtime::new()
                    .context("cannot start the runtime")
                    .and_then(|rt| rt.block_on(flare_node::dashboard::run(opts))),
            );
        }
        (None, None) => {
            eprintln!("error: give --kit <STARTUP_DIR> to run a node, or a command (see --help)");
            return ExitCode::from(2);
        }
        (None, Some(_)) => {}
    }
    exit(run(cli))
}

fn audit(command: &AuditCommand) -> ExitCode {
    use flare_node::audit::{self, AuditError, ShowFilter};
    match command {
        AuditCommand::Verify { file } => match audit::verify(file) {
            Ok(r) => {
                let head = r.last_hash.get(..16).unwrap_or(&r.last_hash);
                println!(
                    "{}: {} lines, chain intact (last {head})",
                    file.display(),
                    r.lines
                );
                ExitCode::SUCCESS
            }
            Err(AuditError::Broken(e)) => {
                eprintln!("{}: {e}", file.display());
                ExitCode::FAILURE
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::from(2)
            }
        },
        AuditCommand::Show { file, job, kind } => {
            let filter = ShowFilter {
                job: job.clone(),
                kind: *kind,
            };
            match audit::show(file, &filter, &mut std::io::stdout().lock()) {
                Ok(_) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn exit(r: anyhow::Result<()>) -> ExitCode {
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let Some(command) = cli.command else {
        return Ok(());
    };
    match command {
        Command::Admin { .. } | Command::Audit(_) | Command::Dashboard { .. } => {}
        Command::Simulate {
            job,
            clients,
            regions,
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
            if let Some(regions) = regions {
                let report = flare_hub::sim::run(&flare_hub::sim::TieredSimOptions {
                    job_dir: job,
                    regions,
                    sites_per_region: clients,
                    workspace,
                    threads: threads.unwrap_or_else(cpus),
                    progress: !quiet,
                })?;
                if json {
                    println!("{}", serde_json::to_string_pretty(&report)?);
                } else {
                    print!("{}", flare_hub::sim::format_table(&report));
                    println!("metrics:       {}", report.metrics_file.display());
                }
                return Ok(());
            }
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
                if !report.cross_site.is_empty() {
                    println!("cross-site evaluation (rows: where it ran; columns: whose model)");
                    println!(
                        "{}",
                        simulator::format_cross_site(&report.cross_site, "accuracy")
                    );
                    for (evaluator, failed) in &report.cross_site_failed {
                        for (model, why) in failed {
                            println!("{evaluator} could not evaluate {model}: {why}");
                        }
                    }
                }
                match &report.statistics {
                    Some(st) => {
                        println!("statistics:    {}", st.files.json.display());
                        if let Some(dir) = st.files.plots.first().and_then(|p| p.parent()) {
                            println!(
                                "plots:         {} ({} histogram_*.svg)",
                                dir.display(),
                                st.files.plots.len()
                            );
                        }
                    }
                    None => println!("final model:   {}", report.final_model.display()),
                }
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
        Command::Provision(args) => cmd_provision::run_provision(&args)?,
        Command::Poc { command } => cmd_provision::run_poc(&command)?,
        Command::Job { cmd } => flare_node::job_cli::run(cmd)?,
        Command::Bench(BenchCommand::Transfer {
            mib,
            relayed,
            plain,
        }) => {
            let r = flare_node::bench_net::run_transfer_mode(mib, relayed, plain)?;
            println!("{r}");
        }
        Command::Bench(BenchCommand::Fedavg {
            params,
            clients,
            rounds,
            progress_every,
            quantize,
            swarm,
            secagg,
        }) => {
            let quantize = quantize
                .map(|q| q.parse::<flare_protocols::filters::QuantizationType>())
                .transpose()?;
            let r = flare_node::bench_net::run_fedavg(&flare_node::bench_net::FedavgBench {
                params,
                clients,
                rounds,
                progress_every,
                quantize,
                swarm,
                secagg,
            })?;
            println!("{r}");
        }
        Command::Bench(BenchCommand::Secagg {
            params,
            clients,
            rounds,
            repeats,
            workflows,
            out,
        }) => {
            use flare_node::bench_secagg::{self as bs, SecAggBench, Workflow};
            let workflows = workflows
                .iter()
                .map(|w| w.parse::<Workflow>())
                .collect::<Result<Vec<_>, _>>()
                .map_err(anyhow::Error::msg)?;
            let r = bs::run_study(&SecAggBench {
                params,
                clients,
                rounds,
                repeats,
                workflows,
                out: out.clone(),
                command: std::iter::once("flare-node".to_string())
                    .chain(std::env::args().skip(1))
                    .collect::<Vec<_>>()
                    .join(" "),
            })?;
            print!("{}", bs::format_table(&r));
            println!(
                "\n{:.0} s; table and measurements in {}",
                r.seconds,
                out.display()
            );
        }
        Command::Bench(BenchCommand::TransferPeer {
            kit,
            receive,
            mib,
            to,
            addr,
            circuit,
            listen,
            relay,
            relayed,
            plain,
        }) => {
            let args = flare_node::bench_net::PeerArgs {
                kit,
                receive,
                mib,
                to: to.map(|t| t.parse()).transpose().context("--to")?,
                addr: addr
                    .iter()
                    .map(|a| a.parse())
                    .collect::<Result<_, _>>()
                    .context("--addr")?,
                circuit: circuit
                    .map(|a| a.parse())
                    .transpose()
                    .context("--circuit")?,
                listen: listen.map(|a| a.parse()).transpose().context("--listen")?,
                relay,
                relayed,
                plain,
            };
            tokio::runtime::Runtime::new()?.block_on(flare_node::bench_net::run_peer(args))?;
        }
        Command::Bench(BenchCommand::ClientApi {
            params,
            tensor_size,
            tasks,
            trainer,
            work_dir,
        }) => {
            let trainer = match trainer {
                Some(t) => t,
                None => std::env::current_exe()?.with_file_name("flare-test-trainer"),
            };
            let r =
                flare_node::bench_client_api::run(&flare_node::bench_client_api::ClientApiBench {
                    params,
                    tensor_size,
                    tasks,
                    trainer,
                    work_dir,
                })?;
            println!("{}", serde_json::to_string_pretty(&r)?);
        }
        Command::Bench(BenchCommand::Centralized { data_dir, epochs }) => {
            let r = flare_node::bench::run_centralized(&data_dir, epochs)?;
            println!("{}", serde_json::to_string(&r)?);
        }
        Command::Bench(BenchCommand::Algorithms {
            rounds,
            epochs,
            seeds,
            sites,
            out,
            quick,
            target,
            learner,
            algorithms,
            data_dir,
            threads,
        }) => {
            use flare_node::bench_algorithms::{self as ba, LearnerKind};
            let learner: LearnerKind = learner.parse().map_err(anyhow::Error::msg)?;
            let mut configs = ba::default_configs();
            if !algorithms.is_empty() {
                configs.retain(|c| {
                    algorithms
                        .iter()
                        .any(|a| a.eq_ignore_ascii_case(&c.aggregator))
                });
                if configs.is_empty() {
                    anyhow::bail!("--algorithms {algorithms:?} matches no configuration");
                }
            }
            let r = ba::run_study(&ba::AlgorithmsBench {
                rounds: rounds.unwrap_or(if quick { 10 } else { 50 }),
                epochs,
                seeds: seeds.unwrap_or(if quick { 1 } else { 3 }),
                sites,
                target: target.unwrap_or_else(|| learner.default_target()),
                learner,
                hidden: 64,
                data_dir,
                out: out.clone(),
                configs,
                threads: threads.unwrap_or_else(cpus),
                progress: true,
            })?;
            print!("{}", ba::format_table(&r));
            println!(
                "\n{:.0} s; table, curves and plot in {}",
                r.seconds,
                out.display()
            );
        }
        Command::Bench(BenchCommand::Dp {
            rounds,
            seeds,
            sites,
            epsilons,
            clip,
            no_adaptive,
            out,
            quick,
            data_dir,
            threads,
        }) => {
            use flare_node::bench_dp::{self as bd, DpBench};
            let r = bd::run_study(&DpBench {
                rounds: rounds.unwrap_or(if quick { 10 } else { 20 }),
                seeds: seeds.unwrap_or(if quick { 1 } else { 3 }),
                sites,
                epsilons,
                clipping_norm: clip,
                adaptive: !no_adaptive,
                threads: threads.unwrap_or_else(cpus),
                progress: true,
                ..DpBench::new(data_dir, out.clone())
            })?;
            print!("{}", bd::format_table(&r));
            println!(
                "\n{:.0} s; table, curves and plot in {}",
                r.seconds,
                out.display()
            );
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
