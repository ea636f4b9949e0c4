//! The `provision` and `poc` subcommands: clap argument types and their handlers.

use std::io::{BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use flare_provision::poc::{self, DEFAULT_POC_DIR, PocOptions};
use flare_provision::project::SAMPLE_PROJECT_YML;
use flare_provision::{Project, ProvisionOutput, provision_now};

use crate::poc_run;

/// `flare-node provision`: make startup kits from a project.yml.
#[derive(Args, Debug, Clone)]
pub struct ProvisionArgs {
    /// The project file. If it does not exist, a commented sample is written there.
    #[arg(short = 'p', long = "project-file", default_value = "project.yml")]
    pub project_file: PathBuf,
    /// The workspace; kits go to <workspace>/<project>/prod_NN/.
    #[arg(short = 'w', long = "workspace", default_value = "workspace")]
    pub workspace: PathBuf,
}

/// `flare-node poc ...`: a local proof-of-concept project.
#[derive(Subcommand, Debug, Clone)]
pub enum PocCommand {
    /// Provision a local project: a server, site-1..site-N and an admin on 127.0.0.1; with
    /// --regions R, a tiered one: the server and its admin, hubs region-1..region-R, each with
    /// site-1..site-N and an admin@region-K (kits in prod_NN/region-K/).
    Prepare {
        /// The number of sites (per region with --regions).
        #[arg(short = 'n', long = "number-of-clients", default_value_t = 2)]
        clients: usize,
        /// Make a tiered project with this many regions, each with a hub.
        #[arg(long)]
        regions: Option<usize>,
        /// The POC folder.
        #[arg(short = 'w', long = "workspace", default_value = DEFAULT_POC_DIR)]
        workspace: PathBuf,
        /// The server's port; the admin port and site ports follow it. Default: the first
        /// free run from 8002, in steps of 100.
        #[arg(long)]
        base_port: Option<u16>,
    },
    /// Start the server, then the hubs, then every site, in the background (logs in each
    /// participant's log.txt, pids in node.pid).
    Start {
        /// The POC folder.
        #[arg(short = 'w', long = "workspace", default_value = DEFAULT_POC_DIR)]
        workspace: PathBuf,
    },
    /// Stop the nodes that `poc start` started (SIGTERM, then SIGKILL after 10 s).
    Stop {
        /// The POC folder.
        #[arg(short = 'w', long = "workspace", default_value = DEFAULT_POC_DIR)]
        workspace: PathBuf,
    },
    /// Remove the POC folder (only if `poc prepare` made it).
    Clean {
        /// The POC folder.
        #[arg(short = 'w', long = "workspace", default_value = DEFAULT_POC_DIR)]
        workspace: PathBuf,
    },
}

fn print_output(out: &ProvisionOutput) {
    println!("provisioned {}", out.prod_dir.display());
    for (name, dir) in &out.kits {
        println!("  {name}: {}", dir.display());
    }
    if let Some(c) = &out.docker_compose {
        println!("  docker compose: {}", c.display());
    }
    if !out.new_ca {
        println!("  (reused the root CA from the workspace's state/ folder)");
    }
}

/// Writes the sample project.yml, asking first when a person is at the terminal.
fn offer_sample(path: &Path) -> anyhow::Result<()> {
    if std::io::stdin().is_terminal() {
        print!(
            "No project file at {}. Write a commented sample there? [y/N] ",
            path.display()
        );
        std::io::stdout().flush().ok();
        let mut answer = String::new();
        std::io::stdin().lock().read_line(&mut answer).ok();
        if !matches!(answer.trim(), "y" | "Y" | "yes") {
            bail!("no project file at {}", path.display());
        }
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(path, SAMPLE_PROJECT_YML)
        .with_context(|| format!("writing {}", path.display()))?;
    bail!(
        "no project file was found, so a commented sample was written to {}; edit it and run `flare-node provision -p {}` again",
        path.display(),
        path.display()
    )
}

/// Runs `flare-node provision`.
pub fn run_provision(args: &ProvisionArgs) -> anyhow::Result<()> {
    if !args.project_file.exists() {
        return offer_sample(&args.project_file);
    }
    let project = Project::load(&args.project_file)
        .with_context(|| format!("invalid project file {}", args.project_file.display()))?;
    let out = provision_now(&project, &args.workspace).context("provisioning failed")?;
    print_output(&out);
    Ok(())
}

/// Runs `flare-node poc <command>`.
pub fn run_poc(cmd: &PocCommand) -> anyhow::Result<()> {
    match cmd {
        PocCommand::Prepare {
            clients,
            regions,
            workspace,
            base_port,
        } => {
            let opts = PocOptions {
                workspace: workspace.clone(),
                clients: *clients,
                base_port: *base_port,
            };
            let out = match regions {
                Some(r) => poc::prepare_tiered_now(&opts, *r)?,
                None => poc::prepare_now(&opts)?,
            };
            println!(
                "POC project written to {} (ports from {})",
                out.project_file.display(),
                out.base_port
            );
            print_output(&out.provisioned);
            Ok(())
        }
        PocCommand::Start { workspace } => {
            let bin = std::env::current_exe().context("locating the flare-node binary")?;
            let started = poc_run::start(workspace, &bin)?;
            for (name, pid) in &started {
                println!("started {name} (pid {pid})");
            }
            println!(
                "logs: <participant>/{} under {}",
                poc_run::LOG_FILE,
                workspace.display()
            );
            // A node with a bad kit or config exits at once; say so rather than leave the
            // person to find out from `poc stop`.
            std::thread::sleep(std::time::Duration::from_millis(500));
            let dead: Vec<&str> = started
                .iter()
                .filter(|(_, pid)| !poc_run::is_alive(*pid))
                .map(|(name, _)| name.as_str())
                .collect();
            if !dead.is_empty() {
                bail!(
                    "exited at once: {} (see their {}); run `flare-node poc stop` to clean up",
                    dead.join(", "),
                    poc_run::LOG_FILE
                );
            }
            Ok(())
        }
        PocCommand::Stop { workspace } => {
            let report = poc_run::stop_detailed(workspace, poc_run::STOP_GRACE)?;
            for (name, pid) in &report.stopped {
                let how = if report.killed.contains(name) {
                    " with SIGKILL"
                } else {
                    ""
                };
                println!("stopped {name} (pid {pid}){how}");
            }
            for (name, pid) in &report.stale {
                match pid {
                    Some(pid) => {
                        println!(
                            "{name}: removed a stale pid file (pid {pid} is not its node any more)"
                        )
                    }
                    None => println!("{name}: removed an unreadable pid file"),
                }
            }
            if report.stopped.is_empty() && report.stale.is_empty() {
                println!("nothing was running under {}", workspace.display());
            }
            Ok(())
        }
        PocCommand::Clean { workspace } => {
            if poc::clean(workspace)? {
                println!("removed {}", workspace.display());
            } else {
                println!("nothing to clean at {}", workspace.display());
            }
            Ok(())
        }
    }
}
