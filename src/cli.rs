//! The command line: one binary, a subcommand per role.

use clap::{Parser, Subcommand};

use crate::telemetry::LogFormat;
use crate::{agent, certs, mutate, status, telemetry, webhook};

/// turnout turns ordinary Deployment updates into zero-downtime progressive releases on Istio.
///
/// Label a namespace `turnout.dev/rollout=enabled`; from then on `kubectl set image`, `kubectl apply`
/// or a GitOps sync of a Deployment there is held by the webhook and released step by step by the agent.
#[derive(Debug, Parser)]
#[command(name = "turnout", version, propagate_version = true)]
pub struct Cli {
    /// Log line format (logs go to standard error).
    #[arg(long, global = true, env = "TURNOUT_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the mutating admission webhook (HTTPS), which holds Deployment updates as releases.
    Webhook(webhook::Args),
    /// Run the routing agent, which turns held Deployment updates into canary releases on Istio.
    Agent(agent::AgentCommand),
    /// Run the webhook and the agent in one process (the simplest install).
    Run(agent::RunCommand),
    /// Show releases: phase, revision, weights per subset, failed checks, message (and Events for one).
    ///
    /// Exit codes: 0 shown; 1 the cluster could not be read; 2 bad usage; 3 no such Deployment.
    Status(status::Args),
    /// Answer one AdmissionReview from standard input (or --file) on standard output, offline.
    Mutate(mutate::Args),
    /// Generate a CA and a serving certificate for the webhook into a directory.
    Certs(certs::Args),
}

/// Runs the parsed command line.
///
/// # Errors
///
/// Whatever the subcommand reports; `main` prints it on one line and exits non-zero.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    telemetry::init(cli.log_format);
    match cli.command {
        Command::Webhook(args) => runtime()?.block_on(webhook::run(args)),
        Command::Agent(args) => runtime()?.block_on(agent::run(args)),
        Command::Run(args) => runtime()?.block_on(agent::run_both(args)),
        Command::Status(args) => Ok(runtime()?.block_on(status::run(&args, &mut std::io::stdout().lock()))?),
        Command::Mutate(args) => Ok(mutate::run(&args, std::io::stdin().lock(), std::io::stdout().lock())?),
        Command::Certs(args) => {
            for path in certs::run(&args)? {
                println!("wrote {}", path.display());
            }
            Ok(())
        }
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    use anyhow::Context as _;
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory as _;

    #[test]
    fn the_command_line_is_consistent() {
        super::Cli::command().debug_assert();
    }
}
