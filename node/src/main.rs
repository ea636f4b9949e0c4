//! The Flare node.

use flare_node::cmd_provision;

use clap::{Parser, Subcommand};

/// One binary for every Flare role.
#[derive(Parser, Debug)]
#[command(name = "flare-node", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Make signed startup kits from a project.yml.
    Provision(cmd_provision::ProvisionArgs),
    /// A local proof-of-concept project.
    Poc {
        #[command(subcommand)]
        command: cmd_provision::PocCommand,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match &cli.command {
        Command::Provision(args) => cmd_provision::run_provision(args),
        Command::Poc { command } => cmd_provision::run_poc(command),
    }
}
